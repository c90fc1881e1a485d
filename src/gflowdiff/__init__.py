"""gflowdiff: diversity-preserving reward fine-tuning of diffusion models with gradient-informed GFlowNets."""

__version__ = "0.1.0"
