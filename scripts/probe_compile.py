"""Quick probe: one UNet (CFG, 2B) and one VAE-decoder forward + input-gradient backward, eager then compiled.

python scripts/probe_compile.py sd15 inductor [whole|blocks]      # the H100 decoder figure in training/compilation.py
"""

import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import benchmark  # noqa: E402

from gflowdiff.training.compilation import compile_networks  # noqa: E402

model, backend = sys.argv[1], sys.argv[2]
scope = sys.argv[3] if len(sys.argv) > 3 else "whole"
args = Namespace(steps=0, lora_scale=0.01, sd15_dir="/tmp/sd15")
with tempfile.TemporaryDirectory() as workdir:
    module = benchmark.build_module(model, Path(workdir), args)
    eager = benchmark.component_figures(module, 4, 3, names=("unet", "decoder"))
    print("eager", eager, flush=True)
    compile_networks(module.policy, None, module.reward, backend, include_reward=False, scope=scope)
    for name in ("decoder", "unet"):
        started = time.perf_counter()
        figures = benchmark.component_figures(module, 4, 3, names=(name,))
        print(f"compiled {name}: {figures} (with compiling: {time.perf_counter() - started:.0f} s)", flush=True)
