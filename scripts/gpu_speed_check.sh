#!/usr/bin/env bash
# GPU speed check for one 10-minute device call: SD-1.5's architecture with random weights, B = 4, bf16.
# Eager reference structure vs fused and stacked adjacent pairs, then stacked pairs with the networks compiled
# (`--model.performance.compile true`). Compiling takes most of the time (the first compiled fused-pairs step at B = 4: 415 s on
# an H100), so the reward is left eager here. Variables:
#   STRUCTURES="reference pairs stacked_pairs"   eager structures (scripts/benchmark.py --structures)
#   COMPILED_STRUCTURES=stacked_pairs            compiled structures (pairs: the fused structure measured before)
#   ROLLOUT=1           also the rollout, eager vs compiled (the call then took more than 9 minutes on an H100)
#   SCOPE=blocks        compile the UNet's repeated blocks instead of the whole UNet
#   COMPILE_REWARD=1    compile the reward's networks too
#   TF32=1              TF32 matmuls for the fp32 networks
#   REWARD_CHUNK=1      VAE decoder + reward passes one image at a time (--model.objective.reward_chunk_size)
#   CHANNELS_LAST=1     after the eager structures, time them again with channels-last networks (the compiled pairs
#                       then compile the channels-last networks)
#   COMPILE=0           eager only, for TF32 / channels-last comparisons (a short call; not yet timed on a GPU)
#   BATCHES="4 8"       more batch sizes (each compiles again at its first call)
#   COMPILED_BATCHES=8  time only these sizes compiled (next to measure: compiled pairs at B = 8 against the
#                       reference structure at B = 4)
# Everything goes unbuffered to OUT_DIR/benchmark.log as it happens, so a run cut short still reports.
# Usage: bash scripts/gpu_speed_check.sh OUT_DIR          (CPU smoke test: MODEL=tiny-sd BACKEND=aot_eager_decomp_partition)
set -euo pipefail
out=${1:-gpu_speed}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
model=${MODEL:-sd15}
sd15=${SD15_DIR:-/tmp/sd15}
if [ "$model" = sd15 ] && [ ! -f "$sd15/pipeline/model_index.json" ]; then
  python3 -m gflowdiff.zoo.sd15_random --out "$sd15" >"$out/build.log" 2>&1
fi
rollout=$([ "${ROLLOUT:-0}" = 1 ] && echo 4 || echo 0)
reward=$([ "${COMPILE_REWARD:-0}" = 1 ] && echo --compile-reward || echo --no-compile-reward)
python3 scripts/benchmark.py --models "$model" --sd15-dir "$sd15" --batch-sizes ${BATCHES:-4} --structures ${STRUCTURES:-reference pairs stacked_pairs} \
  --rollout-batch "$rollout" --no-rollout-merged --repeats 3 $([ "${CHANNELS_LAST:-0}" = 1 ] && echo --channels-last) \
  $([ "${COMPILE:-1}" = 0 ] || echo --compile) --compiled-structures ${COMPILED_STRUCTURES:-stacked_pairs} "$reward" \
  --compile-scope "${SCOPE:-whole}" --compile-backend "${BACKEND:-inductor}" $([ "${TF32:-0}" = 1 ] && echo --tf32) \
  ${REWARD_CHUNK:+--reward-chunk-size $REWARD_CHUNK} \
  ${COMPILED_BATCHES:+--compiled-batch-sizes $COMPILED_BATCHES} --out "$out/benchmark.md" >"$out/benchmark.log" 2>&1 || status=$?
grep -v -i "warn\|^ *warnings\.\|Loading weights\|Writing model" "$out/benchmark.log" | tail -n 25
exit "${status:-0}"
