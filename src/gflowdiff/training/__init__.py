"""Training with Lightning: the LightningModule (``module``), checkpoints (``checkpointing``; ``loading`` rebuilds a
trained module from one), resuming and preemption (``resume``, ``preemption``, ``run_lock``), prompts and their data
module (``prompts``, ``data``), performance options (``compilation``, ``memory_layout``, ``memory_hints``) and what a
run prints (``quiet``)."""
