"""Objective plugins: every public concrete class here is selectable as ``model.objective: {class_path: <Name>}``.

Gradient-informed GFlowNets (the method): ``ResidualNablaDB``, ``NablaDB``. Baselines (docs/method.md §6): ``DDPO``
(policy gradient), ``ReFL`` and ``DRaFT`` (reward backpropagation), ``DB`` and ``ResidualDB`` (scalar detailed
balance).
"""

from gflowdiff.objectives._scalar_db import ScalarDBObjective
from gflowdiff.objectives.base import Objective, ObjectiveContext
from gflowdiff.objectives.db import DB
from gflowdiff.objectives.ddpo import DDPO
from gflowdiff.objectives.draft import DRaFT
from gflowdiff.objectives.gradient_db.nabla_db import NablaDB
from gflowdiff.objectives.gradient_db.objective import GradientDBObjective
from gflowdiff.objectives.gradient_db.residual_nabla_db import ResidualNablaDB
from gflowdiff.objectives.refl import ReFL
from gflowdiff.objectives.residual_db import ResidualDB

__all__ = [
    "DB",
    "DDPO",
    "DRaFT",
    "GradientDBObjective",
    "NablaDB",
    "Objective",
    "ObjectiveContext",
    "ReFL",
    "ResidualDB",
    "ResidualNablaDB",
    "ScalarDBObjective",
]
