"""The diffusion model as a policy: the model adapter (``policy``: diffusers components, LoRA, CFG), the LoRA on some
rows of a batch (``adapter_rows``), the pure math of one DDIM transition (``math``) and of one rectified-flow
transition (``flow_math``), the transition kernels over both (``kernels``), the sampler (``sampling``), the rollout
and transition batches it produces (``types``) and which of their steps are trained (``subsampling``).

Depends on nothing else in gflowdiff but ``rewards.base`` (a rollout ends with the reward of its samples).
"""
