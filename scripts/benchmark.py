"""Benchmark: seconds per trained transition (residual ∇-DB loss + backward) and rollout speed, with peak memory.

Models: the embedded digits model and the tiny random SD pipeline (built from configs; nothing downloaded).
Prints a markdown table. Usage: python scripts/benchmark.py [--models digits tiny-sd] [--batch-sizes 4 16]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gflowdiff.module import GFlowDiffModule
from gflowdiff.objectives import ResidualNablaDB
from gflowdiff.rewards import DigitClassifierReward
from gflowdiff.sampling import SamplerConfig, sample_rollout


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)


def build_module(model: str, workdir: Path, guidance_scale: float) -> GFlowDiffModule:
    if model == "digits":
        path = "embedded:digits"
    elif model == "tiny-sd":
        from gflowdiff.zoo.tiny_sd import build_tiny_sd

        path = str(build_tiny_sd(workdir / "tiny_sd"))
    else:
        raise SystemExit(f"unknown model {model!r}")
    module = GFlowDiffModule(
        objective=ResidualNablaDB(timestep_fraction=0.2),
        reward=DigitClassifierReward(),
        pretrained_model=path,
        sampler=SamplerConfig(num_inference_steps=20, guidance_scale=guidance_scale),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return module.to(device)


def benchmark(module: GFlowDiffModule, batch_size: int, repeats: int) -> dict[str, float]:
    prompts = ["a handwritten digit"] * batch_size
    generator = torch.Generator().manual_seed(0)
    sample_rollout(module.policy, prompts, module.reward, module.sampler, generator)  # warm-up
    rollout_times = []
    for _ in range(repeats):
        started = time.perf_counter()
        rollout = sample_rollout(module.policy, prompts, module.reward, module.sampler, generator)
        rollout_times.append(time.perf_counter() - started)
    chunk = module.objective.transitions(rollout, generator).split(batch_size)[1]  # a non-terminal-heavy chunk
    context = module.context(generator)
    step_times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        module.objective.loss(chunk, context).loss.backward()
        if i > 0:  # the first call is a warm-up
            step_times.append(time.perf_counter() - started)
    module.zero_grad(set_to_none=True)
    return {
        "s_per_transition": statistics.median(step_times) / len(chunk),
        "rollout_samples_per_s": batch_size / statistics.median(rollout_times),
        "peak_mib": peak_memory_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["digits", "tiny-sd"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; 20 sampler steps; CFG {args.guidance_scale}")
    print("| model | B | s / trained transition | rollout samples / s | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            module = build_module(model, Path(workdir), args.guidance_scale)
            for batch_size in args.batch_sizes:
                result = benchmark(module, batch_size, args.repeats)
                print(
                    f"| {model} | {batch_size} | {result['s_per_transition']:.4f} | "
                    f"{result['rollout_samples_per_s']:.1f} | {result['peak_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
