"""``gflowdiff``, ``gflowdiff --help``: a one-screen overview (``fit --help`` lists Lightning's ~360 Trainer options
before the first gflowdiff one), and ``gflowdiff objectives`` / ``gflowdiff rewards``: the classes
``--model.objective`` / ``--model.reward`` take, each with the first line of its docstring (:func:`plugin_choices`:
their short names, which cli.py also lists when a name is unknown)."""

from __future__ import annotations

import inspect
import re

OVERVIEW = """\
gflowdiff: reward fine-tuning of diffusion models (LoRA on the UNet, PyTorch Lightning)

Commands
  gflowdiff fit --config CONFIG.yaml [--KEY VALUE ...]   train; --ckpt_path last resumes the run
  gflowdiff validate|test --config CONFIG.yaml --ckpt_path CKPT
                                                score a checkpoint (without --ckpt_path: the pretrained model)
  gflowdiff sample --ckpt_path CKPT --prompts "a cat" "a dog" --seeds 0 1 --out DIR
                                                write PNGs of a checkpoint's samples (without: the pretrained model)
  gflowdiff compare --configs A.yaml B.yaml --seeds 0 1 --steps N --out DIR
                                                train and compare configs (gflowdiff compare --help)
  gflowdiff objectives                          the objectives --model.objective takes
  gflowdiff rewards                             the rewards --model.reward takes
  gflowdiff fit --help                          every option (Lightning's Trainer options come first)
  gflowdiff fit --model.objective.help NAME     the options of one objective (likewise --model.reward.help NAME)

Key options (fit, validate, test)
  --config FILE                          repeatable; later files and the command line override earlier ones
  --model.pretrained_model MODEL         hub id, local diffusers folder or embedded:digits
  --model.objective NAME                 e.g. ResidualNablaDB; its options: --model.objective.reward_scale 2.0
  --model.reward NAME                    e.g. DigitClassifierReward; its options: --model.reward.<option>
  --model.sampler.num_inference_steps N  also .guidance_scale, .eta
  --model.lora.rank R                    also .alpha, .target_modules
  --model.optimizer.init_args.lr LR      the LoRA's learning rate; --model.optimization.flow_head_lr for the flow head
  --model.optimization.train_batch_size N             transitions per backward pass (a memory knob)
  --data.train_prompts NAME|FILE         and --data.batch_size (trajectories per step)
  --trainer.max_steps N                  and --trainer.logger.init_args.save_dir DIR (run folders)
  --ckpt_path FILE|last                  resume or score a checkpoint
  --print_config                         print the fully resolved config and exit

Configs: configs/digits/*.yaml (runs on a CPU in minutes), configs/sd15/*.yaml (Stable Diffusion 1.5).
"""


def print_overview() -> None:
    print(OVERVIEW, end="")


def summary_line(cls: type) -> str:
    """The first sentence of the first paragraph of ``cls``'s docstring (its first line may end mid-phrase)."""
    doc = (inspect.getdoc(cls) or "").strip()
    paragraph = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    return re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]


def plugin_choices(kind: str) -> list[str]:
    """The short names ``--model.<kind>`` resolves: the concrete public classes of gflowdiff.objectives /
    gflowdiff.rewards."""
    import gflowdiff.objectives
    import gflowdiff.rewards
    from gflowdiff.objectives.base import Objective
    from gflowdiff.rewards.base import Reward

    package, base = (gflowdiff.objectives, Objective) if kind == "objective" else (gflowdiff.rewards, Reward)
    classes = [getattr(package, name, None) for name in package.__all__]
    return sorted(
        c.__name__
        for c in classes
        if isinstance(c, type) and issubclass(c, base) and c is not base and not inspect.isabstract(c)
    )


def plugin_lines(kind: str) -> list[str]:
    """``NAME  first docstring line`` for every class ``--model.<kind>`` resolves by its short name."""
    import gflowdiff.objectives
    import gflowdiff.rewards

    package = gflowdiff.objectives if kind == "objective" else gflowdiff.rewards
    names = plugin_choices(kind)
    width = max(len(name) for name in names)
    return [f"  {name:<{width}}  {summary_line(getattr(package, name))}" for name in names]


def print_plugins(kind: str) -> None:
    print(f"--model.{kind} takes one of (its options: gflowdiff fit --model.{kind}.help NAME):")
    print("\n".join(plugin_lines(kind)))
