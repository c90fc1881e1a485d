"""Model adapters: one interface (:class:`ModelAdapter`) to the diffusers families gflowdiff fine-tunes, one module per
family, chosen by the model's ``model_index.json`` (:func:`adapter_for`) or by name.

- ``stable_diffusion``: SD 1.x / 2.x (``StableDiffusionPipeline``), kernel family "diffusion";
- ``stable_diffusion_xl``: SDXL (``StableDiffusionXLPipeline``), "diffusion";
- ``stable_diffusion_3``: SD3 / SD3.5 (``StableDiffusion3Pipeline``), "flow".
"""

from gflowdiff.diffusion.adapters.base import Conditioning, ModelAdapter
from gflowdiff.diffusion.adapters.select import ADAPTERS, PIPELINE_ADAPTERS, adapter_class, adapter_for, load_adapter
from gflowdiff.diffusion.adapters.stable_diffusion import StableDiffusionAdapter
from gflowdiff.diffusion.adapters.stable_diffusion_3 import StableDiffusion3Adapter
from gflowdiff.diffusion.adapters.stable_diffusion_xl import StableDiffusionXLAdapter

__all__ = [
    "ADAPTERS",
    "PIPELINE_ADAPTERS",
    "Conditioning",
    "ModelAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "adapter_class",
    "adapter_for",
    "load_adapter",
]
