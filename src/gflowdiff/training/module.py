"""The LightningModule: rollout → reward → objective → optimizer. Orchestration and logging only; no equations.

One ``training_step`` consumes one batch of prompts: it samples a rollout with the current policy (no gradients),
asks the objective which transitions to train on, and runs ``optimizer_steps_per_rollout`` optimizer steps over
them, with a backward per chunk of ``train_batch_size`` transitions (memory) and gradient accumulation across the
chunks of a step. Optimization is manual: the number of backward passes per step depends on the objective.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from gflowdiff.diffusion.adapters import adapter_for
from gflowdiff.diffusion.policy import DiffusionPolicy, LoRAConfig
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.diffusion.types import Rollout
from gflowdiff.evaluation.evaluator import EvaluationConfig, Evaluator, sample_pair, side_by_side
from gflowdiff.evaluation.images import image_grid
from gflowdiff.objectives.base import Objective, ObjectiveContext
from gflowdiff.objectives.flow_head import FlowHead, FlowHeadConfig
from gflowdiff.objectives.value_flow_head import ValueFlowHead
from gflowdiff.rewards.base import Reward
from gflowdiff.rewards.self_check import check_reward_gradient
from gflowdiff.training.checkpointing import (
    TRAINABLE_STATE_KEY,
    export_lora,
    log_unlogged_step,
    restore_trainable_state,
    trainable_state,
    unlogged_step_metrics,
)
from gflowdiff.training.data import DeferredPromptBatch
from gflowdiff.training.memory_hints import out_of_memory_message
from gflowdiff.training.optimization import OptimizationConfig, cosine_decay
from gflowdiff.training.performance import PerformanceConfig, apply_performance_options

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step_generator(seed: int, rank: int, rollout_index: int) -> torch.Generator:
    """All randomness of one rollout and its subsampling, as a pure function of (seed, rank, rollout index): a
    resumed run redraws exactly, and every rank draws differently (docs/method.md §7 item 3: the reference seeds every
    rank identically)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + rollout_index + 1_000_000_000)


def split_into_steps(chunks: list, steps: int) -> list[list]:
    """Contiguous, near-equal groups of chunks, one per optimizer step, in the objective's order (so DDPO's inner
    epochs stay one after the other); empty groups are dropped."""
    return [[chunks[i] for i in group] for group in np.array_split(np.arange(len(chunks)), steps) if len(group)]


class GFlowDiffModule(L.LightningModule):
    """Fine-tunes a diffusion model's LoRA (and a flow head, if the objective has one) against a reward.

    Args:
        objective: the training objective (``ResidualNablaDB``, ``NablaDB``, ...).
        reward: the reward model; frozen, fp32, never checkpointed.
        pretrained_model: hub id, local diffusers folder, or ``embedded:digits``.
        revision: hub revision of ``pretrained_model``.
        adapter: the model family (``stable_diffusion``, ``stable_diffusion_xl``, ``stable_diffusion_3``); default:
            chosen by the model's ``model_index.json`` (diffusion/adapters/).
        frozen_dtype: dtype of the frozen UNet, VAE and text encoder (``bfloat16`` on GPU).
        lora: LoRA rank, alpha and target modules.
        sampler: steps, guidance scale and η of the sampler that defines the policy.
        flow_head: size of the flow head g_φ (built only if the objective uses one).
        optimizer: optimizer for the LoRA group (its lr/weight_decay); the flow head gets its own group.
        optimization: how a rollout becomes optimizer steps: chunk size, steps per rollout, clipping, lr decay, the
            flow head group's lr, off-policy data, NaN tolerance (training/optimization.py).
        evaluation: metrics of ``validate``/``test`` and of the validation during ``fit``, image logging
            (evaluation/evaluator.py).
        performance: speed and memory options with the same math: compile, channels-last (training/performance.py).
        seed: seed of rollouts and subsampling (offset by the rank on each device).
        check_reward_gradient: before training a gradient objective, check on a random image that the reward's
            gradient is finite, non-zero and matches finite differences (catches no_grad/detach/clamp rewards).
    """

    def __init__(
        self,
        objective: Objective,
        reward: Reward,
        pretrained_model: str = "embedded:digits",
        revision: str | None = None,
        adapter: str | None = None,
        frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008 (a dataclass: a plain config value)
        sampler: SamplerConfig = SamplerConfig(),  # noqa: B008
        flow_head: FlowHeadConfig = FlowHeadConfig(),  # noqa: B008
        optimizer: OptimizerCallable = torch.optim.AdamW,
        optimization: OptimizationConfig = OptimizationConfig(),  # noqa: B008
        evaluation: EvaluationConfig = EvaluationConfig(),  # noqa: B008
        performance: PerformanceConfig = PerformanceConfig(),  # noqa: B008
        seed: int = 0,
        check_reward_gradient: bool = True,
    ):
        super().__init__()
        objective.check_compatible(reward)  # before any heavy loading
        objective.check_kernel(adapter_for(pretrained_model, adapter, revision).kernel_family, pretrained_model)
        objective.check_sampler(sampler)
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable state (checkpointing.py)

        self.objective, self.reward, self.sampler = objective, reward, sampler
        self.optimizer_factory = optimizer
        self.optimization, self.evaluation, self.performance = optimization, evaluation, performance
        self.seed = seed
        self.check_reward_gradient = check_reward_gradient
        self.evaluator: Evaluator | None = None  # built at the first evaluation (it may load a feature model)
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0

        self.policy = DiffusionPolicy(
            pretrained_model,
            revision,
            lora,
            DTYPES[frozen_dtype],
            adapter=adapter,
            offload_text_encoders=performance.offload_text_encoders,
        )
        dims = (self.policy.latent_channels, self.policy.latent_size, self.policy.text_hidden_size)
        self.flow_head: FlowHead | ValueFlowHead | None = None
        if objective.uses_flow_head:
            kind = getattr(objective, "flow_head_kind", "score")
            if kind == "value":
                self.flow_head = ValueFlowHead(*dims, denoised_input=objective.value_head_reads_denoised)
            else:
                self.flow_head = FlowHead(flow_head, *dims)
        apply_performance_options(performance, self.policy, self.flow_head, self.reward)
        self.trainable_names = {name for name, p in self.named_parameters() if p.requires_grad}
        self.rollouts_done = 0
        self.rollout_buffer: Rollout | None = None
        self.step_awaits_logging = False  # between a training step and Lightning's log of its metrics
        self.unlogged_step: dict[str, Any] | None = None  # a resumed checkpoint's step metrics, logged at train start
        self.last_rollout_summary: dict[str, Any] = {}  # prompts and rewards of this rank's latest rollout

    # ---- optimizer ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{"params": self.policy.lora_parameters(), "name": "lora"}]
        if self.flow_head is not None:
            flow_group: dict[str, Any] = {"params": list(self.flow_head.parameters()), "name": "flow_head"}
            if self.optimization.flow_head_lr is not None:
                flow_group["lr"] = self.optimization.flow_head_lr
            if self.optimization.flow_head_weight_decay is not None:
                flow_group["weight_decay"] = self.optimization.flow_head_weight_decay
            groups.append(flow_group)
        optimizer = self.optimizer_factory(groups)
        if (
            self.optimization.lr_decay == "none" or self._trainer is None
        ):  # no trainer: a parameter-group check (cli.py)
            return optimizer
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError(
                "--model.optimization.lr_decay cosine needs --trainer.max_steps (the length of the schedule)"
            )
        schedule = cosine_decay(optimizer, max_steps * self.optimization.optimizer_steps_per_rollout)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- training ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.check_reward_gradient and self.objective.requires_reward_gradient:
            latent = torch.zeros(2, self.policy.latent_channels, self.policy.latent_size, self.policy.latent_size)
            with torch.no_grad():
                image_shape = self.policy.decode(latent.to(self.device)).shape
            check_reward_gradient(self.reward, image_shape, torch.Generator().manual_seed(self.seed))

    def context(self, generator: torch.Generator) -> ObjectiveContext:
        return ObjectiveContext(self.policy, self.reward, self.sampler, self.flow_head, generator)

    def training_step(self, batch: DeferredPromptBatch | list[str], batch_idx: int) -> None:
        prompts = batch.prompts() if isinstance(batch, DeferredPromptBatch) else list(batch)
        try:
            self.train_on_prompts(prompts)
        except torch.OutOfMemoryError as error:  # the same error, with the options that lower the peak
            raise torch.OutOfMemoryError(
                out_of_memory_message(
                    error,
                    self.objective.memory_options(),
                    compiled=self.performance.compile,
                    train_batch_size=self.optimization.train_batch_size,
                    trajectories=len(prompts),
                    frozen_dtype=self.hparams["frozen_dtype"],
                )
            ) from error
        self.step_awaits_logging = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning calls this after the callbacks' hooks (where checkpoints are written) and right before its log.
        self.step_awaits_logging = False

    def train_on_prompts(self, prompts: list[str]) -> None:
        """One training step: a rollout on ``prompts``, then the objective's loss and optimizer steps on it."""
        started, cpu_started = time.perf_counter(), time.process_time()
        generator = step_generator(self.seed, self.global_rank, self.rollouts_done)
        rollout = sample_rollout(self.policy, prompts, self.reward, self.sampler, generator)
        self.rollouts_done += 1
        bad_rewards = int((~torch.isfinite(rollout.rewards)).sum())
        # Decided together so that every DDP rank skips the same step (a lone skip would hang the gradient sync).
        if self.trainer.strategy.reduce_boolean_decision(bad_rewards > 0, all=False):
            self.skip_step(
                f"--model.reward {type(self.reward).__name__} returned NaN/inf for {bad_rewards} of "
                f"{len(rollout.rewards)} samples (on this rank)"
            )
            return
        rollout = self.objective.prepare_rollout(rollout, self.context(generator))
        rollout_seconds = time.perf_counter() - started
        self.last_rollout_summary = {"prompts": rollout.prompts, "rewards": rollout.rewards.cpu()}
        self.log_rollout(rollout)
        if self.optimization.off_policy:
            rollout, self.rollout_buffer = self.rollout_buffer, rollout
            if rollout is None:  # the first rollout only fills the buffer, as in the reference
                return

        transitions = self.objective.transitions(rollout, generator)
        chunks = transitions.split(self.optimization.train_batch_size)
        groups = split_into_steps(chunks, self.optimization.optimizer_steps_per_rollout)
        optimizer = self.optimizers()
        context = self.context(generator)
        totals: dict[str, float] = {}
        for group in groups:
            optimizer.zero_grad(set_to_none=True)
            extra = self.objective.rollout_loss(rollout, context)
            if extra is not None:
                with self.gradient_sync(enabled=False):  # the group's last chunk all-reduces
                    self.manual_backward(extra.loss)
                for key, value in extra.metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / len(groups)
            transitions_in_step = sum(len(chunk) for chunk in group)
            for index, chunk in enumerate(group):
                # Each chunk's loss is a mean over its transitions; weighted by its share of the step's transitions,
                # the step's loss is the mean over all of them, whatever the chunk size (a memory knob).
                share = len(chunk) / transitions_in_step
                with self.gradient_sync(enabled=index == len(group) - 1):  # DDP all-reduces once per step
                    output = self.objective.loss(chunk, context)
                    # Backpropagated even when non-finite: the NaN then reaches every rank's gradients through the
                    # all-reduce, and all ranks skip the step together below.
                    self.manual_backward(output.loss * share)
                for key, value in output.metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * share / len(groups)
            norms = self.clip_gradients_per_group(optimizer)
            totals.update(norms)
            if not all(math.isfinite(norm) for norm in norms.values()):
                optimizer.zero_grad(set_to_none=True)
                self.skip_step(f"non-finite gradient norm {norms} (loss terms: {output.metrics})")
                continue
            # One optimizer step per accumulation: the reference calls scaler.step() *and* optimizer.step(), i.e.
            # two AdamW updates on the same gradients (docs/method.md §4.2, §7 item 2). Fixed here.
            optimizer.step()
            schedule = self.lr_schedulers()
            if schedule is not None:
                schedule.step()
            self.bad_steps_in_a_row = 0
        totals["train/transitions"] = float(len(transitions))
        totals["train/rollout_seconds"] = rollout_seconds
        totals["train/step_seconds"] = time.perf_counter() - started
        # This process's CPU time: the step's cost on its own threads whatever else shares the machine (at one
        # thread on an idle core, its wall-clock time); scripts/convergence.py's time axis.
        totals["train/step_cpu_seconds"] = time.process_time() - cpu_started
        totals["train/skipped_steps"] = float(self.skipped_steps)
        if self.device.type == "cuda":
            totals["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log_dict(totals, on_step=True, prog_bar=False, batch_size=len(prompts))
        self.log("loss", totals.get("objective/loss", math.nan), prog_bar=True, batch_size=len(prompts))

    def gradient_sync(self, enabled: bool) -> AbstractContextManager:
        """Under DDP, skip the gradient all-reduce for all but the last backward of an accumulation."""
        strategy = self.trainer.strategy
        if enabled or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def skip_step(self, reason: str) -> None:
        """Skip an update with a NaN/inf reward, loss or gradient; stop after too many in a row."""
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        rank_zero_warn(f"skipping a step ({self.bad_steps_in_a_row} in a row): {reason}")
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        if self.bad_steps_in_a_row >= self.optimization.max_consecutive_bad_steps:
            raise FloatingPointError(
                f"{self.bad_steps_in_a_row} consecutive steps had NaN/inf values (last: {reason}). Likely causes: a "
                f"reward that fails on some images (--model.reward), a learning rate too high for this reward scale "
                f"(--model.optimizer.init_args.lr, --model.objective.init_args.reward_scale), or fp16 overflow "
                f"(--trainer.precision). Raise --model.optimization.max_consecutive_bad_steps to tolerate more."
            )

    def clip_gradients_per_group(self, optimizer) -> dict[str, float]:
        """Clip each parameter group to ``max_grad_norm`` (the reference clips LoRA and flow head separately)."""
        norms = {}
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            max_norm = self.optimization.max_grad_norm or float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norms[f"grad_norm/{group.get('name', 'group')}"] = float(norm)
        return norms

    def log_rollout(self, rollout: Rollout) -> None:
        rewards = self.all_gather(rollout.rewards).reshape(-1).float()
        batch = len(rollout.rewards)
        self.log("reward/mean", rewards.mean(), prog_bar=True, batch_size=batch, rank_zero_only=True)
        self.log("reward/std", rewards.std(), batch_size=batch, rank_zero_only=True)
        self.log("reward/max", rewards.max(), batch_size=batch, rank_zero_only=True)
        self.log("reward/min", rewards.min(), batch_size=batch, rank_zero_only=True)
        for name, values in getattr(self.reward, "last_terms", {}).items():  # WeightedSum: each term on its own
            self.log(f"reward/{name}", values.float().mean(), batch_size=batch, sync_dist=True)
        step = self.global_step
        every = self.evaluation.log_images_every_n_steps
        if every and step % every == 0 and self.global_rank == 0:
            self.log_image("samples/train", rollout.images, step)
            experiment = getattr(self.logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_histogram"):
                experiment.add_histogram("reward/histogram", rewards.cpu(), step)

    def log_image(self, tag: str, images: Tensor, step: int, columns: int | None = None) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(tag, image_grid(images, columns=columns), step)

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def get_evaluator(self) -> Evaluator:
        if self.evaluator is None:
            self.evaluator = Evaluator(self.evaluation, self.reward, self.objective.target_beta).to(self.device)
        return self.evaluator

    def evaluation_step(self, prompts: list[str], batch_idx: int, stage: str) -> None:
        # The same noise at every evaluation; the pretrained sets the metrics compare against use independent noise
        # (seed offsets, evaluation/evaluator.py), the same noise only for the side-by-side grids.
        seed = int(step_generator(self.seed + 1, self.global_rank, batch_idx).initial_seed())
        grids = batch_idx == 0 and self.global_rank == 0 and self.evaluation.grid_prompts > 0
        samples = sample_pair(
            self.policy,
            list(prompts),
            self.reward,
            self.sampler,
            seed,
            self.evaluation.compare_to_pretrained,
            same_noise_pretrained=grids and self.evaluation.compare_to_pretrained,
            with_floor=self.evaluation.compare_to_pretrained,
        )
        self.get_evaluator().update(samples)
        if batch_idx == 0 and self.global_rank == 0:
            self.log_image(f"samples/{stage}", samples.tuned.images, self.global_step)
            count = min(self.evaluation.grid_prompts, len(prompts))
            if samples.pretrained_same_noise is not None and count:  # pretrained | fine-tuned from the same noise
                grid = side_by_side(samples.pretrained_same_noise.images[:count], samples.tuned.images[:count])
                self.log_image(f"samples/{stage}_pretrained_vs_finetuned", grid, self.global_step, columns=2)

    def log_evaluation(self, stage: str) -> None:
        evaluator = self.get_evaluator()
        if evaluator.batches_seen == 0:
            return
        results = evaluator.compute()  # synchronised across ranks by torchmetrics
        evaluator.reset()
        self.log_dict({f"{stage}/{key}": value for key, value in results.items()}, rank_zero_only=True)

    def validation_step(self, prompts: list[str], batch_idx: int) -> None:
        self.evaluation_step(prompts, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def test_step(self, prompts: list[str], batch_idx: int) -> None:
        self.evaluation_step(prompts, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = trainable_state(self)
        checkpoint[TRAINABLE_STATE_KEY] = {
            "rollouts_done": self.rollouts_done,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
            "rollout_buffer": None if self.rollout_buffer is None else self.rollout_buffer.to_state(),
            # Written at a step's end, the checkpoint precedes that step's log: keep its metrics (checkpointing.py).
            "unlogged_step": unlogged_step_metrics(self.trainer) if self.step_awaits_logging else None,
        }

    def on_train_end(self) -> None:
        """Export the LoRA in diffusers format next to the logs (``pipe.load_lora_weights(<log_dir>/lora)``)."""
        if self.trainer.logger is None:  # no run folder to write into
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir:
            export_lora(self.policy, Path(log_dir) / "lora")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_trainable_state(self, checkpoint)

    def on_train_start(self) -> None:
        warm_up = getattr(self.objective, "warm_up", None)
        if warm_up is not None and self.global_step == 0 and self.rollouts_done == 0:  # not on resume
            prompts = getattr(self.trainer.datamodule, "train_prompt_list", None)
            started, cpu_started = time.perf_counter(), time.process_time()
            metrics = warm_up(self.context(step_generator(self.seed, self.global_rank, -1)), prompts or [""])
            if metrics:
                seconds = time.perf_counter() - started
                rank_zero_info(f"flow head warm-up: {metrics} in {seconds:.0f} s")
                if self.logger is not None:  # part of the training time (scripts/convergence.py adds it)
                    cpu_seconds = time.process_time() - cpu_started
                    self.logger.log_metrics(
                        {**metrics, "train/warmup_seconds": seconds, "train/warmup_cpu_seconds": cpu_seconds}, step=0
                    )
        if self.unlogged_step is not None:  # resumed from a checkpoint written before its step's log
            log_unlogged_step(self.trainer, self.unlogged_step)
            self.unlogged_step = None
