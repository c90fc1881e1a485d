"""Options gflowdiff no longer has, as they appear in the hyperparameters of older checkpoints.

A checkpoint made with a retired option at a value that changes nothing still loads (the option is dropped); one
made with a value whose behaviour is gone is refused with a message naming the option.
"""

from __future__ import annotations

from typing import Any

# objective option → (the value that behaved as today's code, what replaced the others)
RETIRED_OBJECTIVE_OPTIONS: dict[str, tuple[Any, str]] = {
    "reverse_loss_trains_policy": (False, "removed: its cost and effect were never measured (docs/performance.md)"),
}
# objective option → {retired value: today's value with the same loss and gradients}
RENAMED_OBJECTIVE_VALUES: dict[str, dict[Any, Any]] = {
    "pass_structure": {"reference": "fused"},  # the reference structure is now the tests' oracle: the same loss
}


def migrate_objective(objective: Any, source: str) -> Any:
    """The objective's ``{class_path, init_args}`` from a checkpoint's hyperparameters, with retired options
    dropped or mapped; ``source`` names the checkpoint in the error."""
    if not isinstance(objective, dict) or not isinstance(objective.get("init_args"), dict):
        return objective
    init_args = dict(objective["init_args"])
    for option, (harmless, why) in RETIRED_OBJECTIVE_OPTIONS.items():
        if option in init_args:
            value = init_args.pop(option)
            if value != harmless:
                raise ValueError(
                    f"{source} was trained with --model.objective.{option} {value!r}, which gflowdiff no longer "
                    f"has ({why}); only {harmless!r} can be loaded"
                )
    for option, mapping in RENAMED_OBJECTIVE_VALUES.items():
        if init_args.get(option) in mapping:
            init_args[option] = mapping[init_args[option]]
    return {**objective, "init_args": init_args}
