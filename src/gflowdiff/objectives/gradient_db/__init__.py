"""The gradient-informed detailed-balance objectives (∇-DB, residual ∇-DB: the method, docs/method.md §2).

``objective`` holds their shared machinery (``GradientDBObjective``), ``math`` its pure math, ``scores`` the small
types its pass structures share, ``_stacked_passes`` the stacked structure (the reference code's passes are a
test oracle, tests/objectives/reference_structure.py),
``pathwise_flow`` the pathwise flow-score targets; ``nabla_db`` and ``residual_nabla_db`` the two objectives.
Users select them through :mod:`gflowdiff.objectives` (``class_path: ResidualNablaDB``).
"""
