"""Benchmark: residual ∇-DB training transitions per second in the fused and the reference pass structure, rollout
samples per second with the LoRA merged and unmerged, and peak memory.

Models (nothing downloaded): ``digits`` (the embedded model), ``tiny-sd`` (a tiny random SD pipeline), ``sd15``
(SD-1.5's architecture with random weights, bf16, 512×512, CFG 5, 50 steps, a CLIP-L aesthetic reward; for a GPU).
All pass structures compute the same loss (tests/objectives/test_pass_structure.py), so their ratio is the speed-up of
gflowdiff's passes over the reference code's (docs/method.md §3.1), measured in one run on one machine. ``pairs`` is the
fused structure on B/2 pairs of adjacent transitions (``adjacent_pairs: true``), which share a state; ``stacked`` and
``stacked_pairs`` batch the three UNet passes of the fused structure into one call (``pass_structure: stacked``).
Prints markdown tables; ``--components`` adds the time of a UNet and a VAE-decoder forward + input-gradient backward.

    python scripts/benchmark.py --models digits tiny-sd --batch-sizes 4 16
    python scripts/benchmark.py --models sd15 --batch-sizes 1 2 4 8          # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from gflowdiff.diffusion.policy import LoRAConfig
from gflowdiff.diffusion.sampling import SamplerConfig, sample_rollout
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.objectives.flow_head import FlowHeadConfig
from gflowdiff.rewards import AestheticReward, DigitClassifierReward
from gflowdiff.training.compilation import compile_networks, describe
from gflowdiff.training.memory_layout import use_channels_last
from gflowdiff.training.module import GFlowDiffModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests' oracle
from tests.objectives.reference_structure import reference_loss  # noqa: E402

CUDA = torch.cuda.is_available()


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (it never resets)."""
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB


def autocast():
    """bf16 autocast on GPU, as ``--trainer.precision bf16-mixed`` runs a training step; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else nullcontext()


def build_module(model: str, workdir: Path, args: argparse.Namespace) -> GFlowDiffModule:
    # λ > 0 as in the reference runs
    objective = ResidualNablaDB(timestep_fraction=0.1, trust_region_scale=1.0, reward_chunk_size=args.reward_chunk_size)
    if model == "digits":
        module = GFlowDiffModule(
            objective=objective,
            reward=DigitClassifierReward(),
            pretrained_model="embedded:digits",
            lora=LoRAConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]),
            sampler=SamplerConfig(num_inference_steps=args.steps or 20, guidance_scale=1.0),
            flow_head=FlowHeadConfig(block_out_channels=[32, 64], cross_attention_levels=0),
        )
    elif model == "tiny-sd":
        from gflowdiff.zoo.tiny_sd import build_tiny_sd

        module = GFlowDiffModule(
            objective=objective,
            reward=DigitClassifierReward(),
            pretrained_model=str(build_tiny_sd(workdir / "tiny_sd")),
            sampler=SamplerConfig(num_inference_steps=args.steps or 20, guidance_scale=5.0),
            flow_head=FlowHeadConfig(block_out_channels=[8, 16], norm_num_groups=4),
        )
    elif model == "sd15":
        from gflowdiff.zoo.sd15_random import build_clip_l_aesthetic, build_sd15_pipeline

        root = Path(args.sd15_dir) if args.sd15_dir else workdir / "sd15"
        if not (root / "pipeline" / "model_index.json").exists():
            build_sd15_pipeline(root / "pipeline")
            build_clip_l_aesthetic(root)
        module = GFlowDiffModule(
            objective=objective,
            reward=AestheticReward(clip_model=str(root / "clip"), head_path=str(root / "head.pth")),
            pretrained_model=str(root / "pipeline"),
            frozen_dtype="bfloat16" if CUDA else "float32",
            sampler=SamplerConfig(num_inference_steps=args.steps or 50, guidance_scale=5.0),
            flow_head=FlowHeadConfig(
                block_out_channels=[64, 128, 256, 256], cross_attention_levels=3, norm_num_groups=32
            ),
        )
    else:
        raise SystemExit(f"unknown model {model!r}: use digits, tiny-sd or sd15")
    module = module.to("cuda" if CUDA else "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking LoRA and flow head: every term of the loss is live
        for name, p in module.named_parameters():
            if "lora_B" in name or (name.startswith("flow_head") and "conv_out" in name):
                p.copy_(args.lora_scale * torch.randn(p.shape, generator=generator).to(p.device))
    return module


def timed(function, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (``warm_up=False``: the caller made it)."""
    if warm_up:
        function()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rollout_figures(module: GFlowDiffModule, batch_size: int, repeats: int, merged: bool = True) -> dict[str, float]:
    """Samples per second with the LoRA unmerged and (``merged``) merged, and how far merging moves the samples."""
    prompts = ["a photo of a cat"] * batch_size

    def sample(merge: bool, pretrained: bool = False):
        sampler = replace(module.sampler, merge_lora=merge)
        with module.policy.reference() if pretrained else nullcontext(), autocast():
            return sample_rollout(module.policy, prompts, None, sampler, torch.Generator().manual_seed(0))

    figures = {}
    for merge in (False, True) if merged else (False,):
        seconds = timed(lambda merge=merge: sample(merge), repeats)
        figures["merged" if merge else "unmerged"] = batch_size / seconds
    if not merged:
        return figures
    unmerged, merged, pretrained = sample(False).latents[:, -1], sample(True).latents[:, -1], sample(False, True)
    lora_effect = (unmerged - pretrained.latents[:, -1]).float().abs().mean()
    figures["merge_deviation"] = float((merged - unmerged).float().abs().mean() / lora_effect)
    return figures


def transition_batches(module: GFlowDiffModule, batch_size: int) -> dict[str, object]:
    """``batch_size`` non-terminal transitions: one mid-trajectory step of B trajectories, and (``pairs``) two adjacent
    steps of B/2 trajectories."""
    rollout = sample_rollout(
        module.policy, ["a photo of a cat"] * batch_size, module.reward, module.sampler, torch.Generator()
    )
    middle = rollout.num_steps // 2
    chunk = rollout.transitions(torch.arange(batch_size), torch.full((batch_size,), middle, dtype=torch.long))
    half = batch_size // 2
    pairs = rollout.transitions(
        torch.arange(half).repeat_interleave(2), torch.tensor([middle, middle + 1] * half, dtype=torch.long)
    )
    return {"single": chunk, "pairs": pairs}


def transition_figures(
    module: GFlowDiffModule, batches: dict[str, object], repeats: int, structures: list[str]
) -> dict[str, dict[str, float]]:
    """Loss + backward of the batch of non-terminal transitions in each pass structure (``+compile``: the networks
    are compiled already, the first call, which compiles, is timed on its own; ``+channels_last``: the networks are
    channels-last already)."""
    batch_size = len(batches["single"].x)
    context = module.context(torch.Generator().manual_seed(0))
    figures = {}
    for structure in structures:
        pass_structure, kind = STRUCTURES[structure.split("+")[0]]
        if kind == "pairs" and batch_size % 2:
            continue
        if pass_structure == "reference":  # the reference code's passes: the tests' oracle
            loss_of = partial(reference_loss, module.objective)
        else:
            module.objective.pass_structure = pass_structure
            loss_of = module.objective.loss
        batch = batches[kind]

        def train_step(batch=batch, loss_of=loss_of):
            with autocast():
                loss = loss_of(batch, context).loss
            loss.backward()
            module.zero_grad(set_to_none=True)
            return float(loss.detach())

        started = time.perf_counter()
        try:
            loss = train_step()  # compiled networks: the first call compiles
            print(f"  B={batch_size} {structure}: loss {loss:.6g}, first call {time.perf_counter() - started:.1f} s",
                  flush=True)  # fmt: skip
            reset_peak()
            seconds = timed(train_step, repeats, warm_up=False)
        except torch.OutOfMemoryError:  # the other structures at this B still run
            print(f"  B={batch_size} {structure}: out of memory", flush=True)
            module.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        figures[structure] = {"transitions_per_s": batch_size / seconds, "ms": 1000 * seconds,
                              "peak_gib": peak_memory_gib()}  # fmt: skip
        print(f"  B={batch_size} {structure}: {1000 * seconds:.0f} ms, {figures[structure]['peak_gib']:.2f} GiB",
              flush=True)  # fmt: skip
    module.objective.pass_structure = "fused"
    return figures


def time_variant(
    module: GFlowDiffModule,
    batches: dict[int, dict[str, object]],
    figures: dict[int, dict[str, dict[str, float]]],
    batch_sizes: list[int],
    names: list[str],
    repeats: int,
) -> None:
    """Add the figures of ``names`` (structures of a variant: ``+channels_last``, ``+compile``) at each batch size."""
    for batch_size in batch_sizes:
        figures[batch_size] |= transition_figures(module, batches[batch_size], repeats, names)


def table_header(names: list[str]) -> list[str]:
    columns = [f"{LABELS[name]} (transitions/s)" + ("" if name == "reference" else " | speed-up") for name in names]
    arrows = " → ".join(SHORT[name] for name in names)
    header = f"| B | {' | '.join(columns)} | ms / step {arrows} | peak GiB {arrows} |"
    return [header, "|---" * (header.count("|") - 1) + "|"]


def table_row(batch_size: int, figures: dict[str, dict[str, float]], names: list[str]) -> str:
    """One markdown row; a structure that was not run (or B odd, for pairs) shows as –. Speed-ups are against the
    eager reference structure of the same run."""

    def show(structure: str, key: str, digits: int) -> str:
        return f"{figures[structure][key]:.{digits}f}" if structure in figures else "–"

    def speedup(structure: str) -> str:
        if structure not in figures or "reference" not in figures:
            return "–"
        return f"{figures[structure]['transitions_per_s'] / figures['reference']['transitions_per_s']:.2f}×"

    cells = [show(n, "transitions_per_s", 2) + ("" if n == "reference" else f" | {speedup(n)}") for n in names]
    return (
        f"| {batch_size} | {' | '.join(cells)} | {' → '.join(show(n, 'ms', 0) for n in names)} | "
        f"{' → '.join(show(n, 'peak_gib', 2) for n in names)} |"
    )


# benchmark name → (the objective's pass_structure, which batch: single steps or adjacent pairs)
STRUCTURES = {
    "reference": ("reference", "single"),
    "fused": ("fused", "single"),
    "pairs": ("fused", "pairs"),
    "stacked": ("stacked", "single"),
    "stacked_pairs": ("stacked", "pairs"),
}
_EAGER_LABELS = {
    "reference": "reference structure",
    "fused": "fused",
    "pairs": "fused, adjacent pairs",
    "stacked": "stacked",
    "stacked_pairs": "stacked, adjacent pairs",
}
LABELS = (
    _EAGER_LABELS
    | {f"{name}+channels_last": f"{label}, channels-last" for name, label in _EAGER_LABELS.items()}
    | {f"{name}+compile": f"{label}, compiled" for name, label in _EAGER_LABELS.items()}
)
SHORT = {  # column names in the ms / GiB chains
    name: name.replace("+compile", " compiled").replace("+channels_last", " channels-last") for name in LABELS
}


COMPONENT_NAMES = {"unet": "UNet (CFG, 2B)", "decoder": "VAE decoder", "reward": "reward"}


def component_figures(
    module: GFlowDiffModule, batch_size: int, repeats: int, names: tuple[str, ...] = ("unet", "decoder", "reward")
) -> dict[str, float]:
    """Milliseconds of one forward + input-gradient backward of each network at batch B (UNet: 2B with CFG)."""
    policy, device = module.policy, module.device
    shape = (batch_size, policy.latent_channels, policy.latent_size, policy.latent_size)
    prompts = ["a photo of a cat"] * batch_size
    embeds, negative = policy.encode_prompts(prompts), policy.encode_prompts([""] * batch_size)
    t = torch.full((batch_size,), 501, device=device)
    latents = torch.randn(shape, device=device)
    with torch.no_grad():
        images = policy.decode(latents)

    def unet():
        x = latents.clone().requires_grad_(True)
        with autocast():
            eps = policy.kernel_output(x, t, embeds, negative, module.sampler.guidance_scale)
        torch.autograd.grad(eps.float().square().sum(), x)

    def decoder():
        x = latents.clone().requires_grad_(True)
        with autocast():
            out = policy.decode(x)
        torch.autograd.grad(out.sum(), x)

    def reward():
        x = images.clone().requires_grad_(True)
        torch.autograd.grad(module.reward(x, prompts).sum(), x)

    passes = {"unet": unet, "decoder": decoder, "reward": reward}
    return {name: 1000 * timed(passes[name], repeats) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "tiny-sd"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--rollout-batch", type=int, default=8, help="trajectories per timed rollout (0: skip)")
    parser.add_argument("--structures", nargs="+", default=["reference", "fused", "stacked", "pairs", "stacked_pairs"],
                        choices=list(STRUCTURES))  # fmt: skip
    parser.add_argument("--steps", type=int, default=0, help="sampler steps (default: 20, 50 for sd15)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-scale", type=float, default=0.01, help="std of the random LoRA B / flow head output")
    parser.add_argument("--sd15-dir", default=None, help="reuse (or create) the random SD-1.5 files here")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--components", action="store_true", help="also time UNet, VAE decoder and reward passes")
    parser.add_argument("--channels-last", action="store_true",
                        help="then store the networks channels-last and time --structures and the rollout again "
                        "(a later --compile compiles the channels-last networks)")  # fmt: skip
    parser.add_argument(
        "--compile",
        action="store_true",
        help="then torch.compile the networks and time --compiled-structures and the rollout again",
    )
    parser.add_argument("--compiled-structures", nargs="+", default=["pairs", "fused", "reference"],
                        choices=list(STRUCTURES))  # fmt: skip
    parser.add_argument("--compiled-batch-sizes", nargs="+", type=int, default=None,
                        help="of --batch-sizes, those timed compiled (default: all; each compiles)")  # fmt: skip
    parser.add_argument("--rollout-merged", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the rollout with the LoRA merged")  # fmt: skip
    parser.add_argument("--compile-reward", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile: also compile the reward's networks")  # fmt: skip
    parser.add_argument("--reward-chunk-size", type=int, default=None,
                        help="VAE decoder + reward on at most this many images at a time (less memory)")  # fmt: skip
    parser.add_argument("--tf32", action="store_true",
                        help="fp32 matmuls in TF32, as the reference code")  # fmt: skip
    parser.add_argument("--compile-scope", default="whole", choices=["blocks", "whole"], help="of the UNet")
    parser.add_argument(
        "--compile-backend", default="inductor", help="aot_eager_decomp_partition: a quick CPU check of the plumbing"
    )
    args = parser.parse_args()
    if not set(args.compiled_batch_sizes or []) <= set(args.batch_sizes):
        parser.error("--compiled-batch-sizes must be among --batch-sizes")
    if args.tf32:
        torch.set_float32_matmul_precision("high")

    device = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 UNet/VAE under bf16 autocast" if CUDA else "fp32"
    precision += ", TF32 matmuls" if args.tf32 else ""
    lines = [f"{datetime.date.today()} · {device} · torch {torch.__version__} · {precision}; LoRA r8, flow head and "
             "reward in fp32"]  # fmt: skip

    def emit(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            module = build_module(model, Path(workdir), args)
            s = module.sampler
            emit(f"\n**{model}** ({s.num_inference_steps} steps, CFG {s.guidance_scale:g})\n")
            names = list(args.structures)
            figures: dict[int, dict[str, dict[str, float]]] = {}
            batches = {}
            for batch_size in args.batch_sizes:
                batches[batch_size] = transition_batches(module, batch_size)
                figures[batch_size] = transition_figures(module, batches[batch_size], args.repeats, names)
            rollout = None
            if args.rollout_batch:
                rollout = rollout_figures(module, args.rollout_batch, args.repeats, args.rollout_merged)
            channels_last_rollout = None
            if args.channels_last:
                print("  channels-last:", ", ".join(use_channels_last(module.policy, module.flow_head, module.reward)),
                      flush=True)  # fmt: skip
                channels_last_names = [f"{name}+channels_last" for name in args.structures]
                names += channels_last_names
                time_variant(module, batches, figures, args.batch_sizes, channels_last_names, args.repeats)
                if args.rollout_batch:
                    channels_last_rollout = rollout_figures(module, args.rollout_batch, args.repeats, merged=False)
            compiled_rollout = None
            if args.compile:
                compiled_names = [f"{name}+compile" for name in args.compiled_structures]
                compiled = compile_networks(
                    module.policy, module.flow_head, module.reward, args.compile_backend, args.compile_reward,
                    args.compile_scope,
                )  # fmt: skip
                print("  compiling:", describe(compiled), flush=True)
                names += compiled_names
                sizes = args.compiled_batch_sizes or args.batch_sizes
                time_variant(module, batches, figures, sizes, compiled_names, args.repeats)
                if args.rollout_batch:
                    started = time.perf_counter()
                    compiled_rollout = rollout_figures(module, args.rollout_batch, args.repeats, merged=False)
                    print(f"  compiled rollout: {time.perf_counter() - started:.0f} s with compiling", flush=True)
            for line in table_header(names):
                emit(line)
            for batch_size in args.batch_sizes:
                emit(table_row(batch_size, figures[batch_size], names))  # a structure out of memory shows as –
            if rollout and "merged" in rollout:
                r = rollout
                emit(f"\nrollout, {args.rollout_batch} trajectories: {r['unmerged']:.2f} samples/s with the LoRA "
                     f"unmerged, {r['merged']:.2f} merged ({r['merged'] / r['unmerged']:.2f}×); merged − unmerged "
                     f"final latents: {100 * r['merge_deviation']:.2f} % of the LoRA effect (mean |Δ|)")  # fmt: skip
            if rollout and "merged" not in rollout:
                emit(
                    f"\nrollout, {args.rollout_batch} trajectories, LoRA unmerged: {rollout['unmerged']:.2f} samples/s"
                )
            for label, variant in (("channels-last", channels_last_rollout), ("compiled", compiled_rollout)):
                if variant:
                    c = variant["unmerged"]
                    emit(f"rollout {label}, LoRA unmerged: {c:.2f} samples/s ({c / rollout['unmerged']:.2f}× the "
                         "eager unmerged rollout)")  # fmt: skip
            if args.components:
                for batch_size in args.batch_sizes:
                    c = component_figures(module, batch_size, args.repeats)
                    ms = ", ".join(f"{name} {c[key]:.0f} ms" for key, name in COMPONENT_NAMES.items())
                    emit(f"components at B={batch_size}, forward + input-gradient backward: {ms}")
            del module
            if CUDA:
                torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
