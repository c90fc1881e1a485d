"""What to change when a training step runs out of GPU memory: the options that lower the peak, named as command-line
flags, for the error message. Those that keep the math come first."""

from __future__ import annotations


def out_of_memory_message(
    error: BaseException,
    objective_options: list[str],
    compiled: bool,
    train_batch_size: int,
    trajectories: int,
    frozen_dtype: str,
) -> str:
    """``error``'s text followed by the options that lower the peak memory, most specific first.

    ``objective_options``: the objective's own (:meth:`gflowdiff.objectives.base.Objective.memory_options`).
    """
    same_math = list(objective_options)
    if not compiled:
        same_math.append(
            "--model.performance.compile true (torch.compile: a much lower peak at SD-1.5 size, "
            "docs/performance.md; the first steps compile for minutes)"
        )
    if train_batch_size > 1:
        same_math.append(
            f"--model.optimization.train_batch_size {train_batch_size // 2} (now {train_batch_size}: transitions per "
            "backward; the chunks accumulate into the same optimizer steps, the same update when they stay equal in "
            "size)"
        )
    other = []
    if frozen_dtype == "float32":
        other.append("--model.frozen_dtype bfloat16 (the frozen UNet, VAE and text encoder in half the memory)")
    if trajectories > 1:
        other.append(
            f"--data.batch_size {trajectories // 2} (now {trajectories}: trajectories per rollout and device; fewer "
            "transitions per step)"
        )
    lines = [f"{error}", "", "gflowdiff: the training step ran out of memory. Options that lower the peak:"]
    lines += [f"  - {option}" for option in same_math]
    lines += [f"  - {option} [changes the run]" for option in other]
    return "\n".join(lines)
