"""``gflowdiff compare``: the run registry (``runs``: what determines a run and where it lives), training configs ×
seeds (``compare``) and the evaluation, table and plots of the finished runs (``report``)."""
