"""Options gflowdiff no longer has, or has moved, as they appear in older checkpoints and configs.

A checkpoint made with a retired option at a value that changes nothing still loads (the option is dropped); one
made with a value whose behaviour is gone is refused with a message naming the option. Module options that moved into
a group (``--model.train_batch_size`` → ``--model.optimization.train_batch_size``) are moved back into place when a
checkpoint loads; a config or command line that still uses the old name is refused with the new one (cli.py).
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


# module option (flat until December 2026) → the group that holds it now
MOVED_MODULE_OPTIONS: dict[str, str] = {
    **dict.fromkeys(
        [
            "train_batch_size",
            "optimizer_steps_per_rollout",
            "max_grad_norm",
            "lr_decay",
            "flow_head_lr",
            "flow_head_weight_decay",
            "off_policy",
            "max_consecutive_bad_steps",
        ],
        "optimization",
    ),
    **dict.fromkeys(["compile", "compile_scope", "compile_backend", "channels_last"], "performance"),
    "log_images_every_n_steps": "evaluation",
}


def migrate_module_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's module hyperparameters with the flat options of older versions moved into their groups (a
    copy; the groups' other options keep their defaults)."""
    migrated = {key: value for key, value in hparams.items() if key not in MOVED_MODULE_OPTIONS}
    for option, group in MOVED_MODULE_OPTIONS.items():
        if option in hparams:
            migrated[group] = {**(migrated.get(group) or {}), option: hparams[option]}
    return migrated


def moved_option_messages(model_options: Any, where: str, prefix: str = "model.") -> list[str]:
    """One line per old flat option among a config's ``model:`` options (``where`` names the file or flag)."""
    if not isinstance(model_options, dict):
        return []
    return [
        f"{where}: {prefix}{option} is now {prefix}{group}.{option}"
        for option, group in MOVED_MODULE_OPTIONS.items()
        if option in model_options
    ]


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
