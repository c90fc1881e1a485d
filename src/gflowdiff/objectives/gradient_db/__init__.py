"""The gradient-informed detailed-balance objectives (∇-DB, residual ∇-DB: the method, docs/method.md §2).

``objective`` holds their shared machinery (``GradientDBObjective``), ``math`` its pure math, ``scores`` the small
types its pass structures share, ``_stacked_passes`` and ``_reference_passes`` two of those structures,
``pathwise_flow`` the pathwise flow-score targets; ``nabla_db`` and ``residual_nabla_db`` the two objectives.
Users select them through :mod:`gflowdiff.objectives` (``class_path: ResidualNablaDB``).
"""
