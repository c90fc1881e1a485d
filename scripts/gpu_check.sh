#!/usr/bin/env bash
# GPU check: SD-1.5's architecture with random weights (built from configs), bf16, 512×512, CFG 5, 50 steps.
#   1. scripts/benchmark.py: reference, fused, pairs, stacked pairs at B = 1, 2, 4, 8; merged vs unmerged rollout; components
#   2. a few `gflowdiff fit` steps of residual ∇-DB with --trainer.precision bf16-mixed (seconds per step, peak memory)
# Usage (on a machine with a CUDA torch): bash scripts/gpu_check.sh OUT_DIR
set -euo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' | tee "$out/device.txt"
import torch
if torch.cuda.is_available():
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda, f"{memory:.0f} GiB")
else:
    print("no CUDA device: CPU path (a smoke test of this script)")
PY
sd15=${SD15_DIR:-/tmp/sd15}
test -f "$sd15/pipeline/model_index.json" || python3 -m gflowdiff.zoo.sd15_random --out "$sd15"
python3 scripts/benchmark.py --models ${MODEL:-sd15} --sd15-dir "$sd15" --batch-sizes ${BATCH_SIZES:-1 2 4 8} --rollout-batch 8 \
  --components --out "$out/benchmark_sd15.md"
python3 -m gflowdiff.cli fit --config configs/sd15/residual_nabla_db_aesthetic.yaml --config configs/sd15/trainer/1gpu.yaml \
  --model.pretrained_model "$sd15/pipeline" --model.reward.init_args.clip_model "$sd15/clip" \
  --model.reward.init_args.head_path "$sd15/head.pth" --data.batch_size 4 --trainer.max_steps ${FIT_STEPS:-4} \
  --trainer.logger.init_args.save_dir "$out/runs" --trainer.enable_progress_bar false \
  --trainer.accelerator ${ACCELERATOR:-gpu} 2>&1 | tail -n 20
python3 - "$out/runs" <<'PY' | tee "$out/fit_summary.txt"
import sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
version = sorted(Path(sys.argv[1]).glob("*/version_*"))[-1]
events = EventAccumulator(str(version), size_guidance={"scalars": 0}); events.Reload()
for tag in ("train/step_seconds", "train/rollout_seconds", "train/peak_memory_gib", "objective/loss", "reward/mean"):
    if tag in events.Tags()["scalars"]:
        print(tag, [round(s.value, 3) for s in events.Scalars(tag)])
PY
