"""Evaluation: fine-tuned vs pretrained samples from the same noise → metrics (``evaluator``), the metrics themselves
(``metrics/``: torchmetrics, correct under DDP) and image grids for TensorBoard (``images``)."""
