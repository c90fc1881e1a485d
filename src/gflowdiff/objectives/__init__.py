"""Objective plugins: every public concrete class here is selectable as ``model.objective: {class_path: <Name>}``."""

from gflowdiff.objectives.base import Objective, ObjectiveContext
from gflowdiff.objectives.gradient_db import GradientDBObjective
from gflowdiff.objectives.nabla_db import NablaDB
from gflowdiff.objectives.residual_nabla_db import ResidualNablaDB

__all__ = ["GradientDBObjective", "NablaDB", "Objective", "ObjectiveContext", "ResidualNablaDB"]
