"""Shared fixtures: tiny random SD, SDXL and SD3 pipelines built from configs (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gflowdiff.zoo.tiny_sd import build_tiny_sd
from gflowdiff.zoo.tiny_sd3 import build_tiny_sd3
from gflowdiff.zoo.tiny_sdxl import build_tiny_sdxl

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub loads fail fast instead of retrying for a minute
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("GFLOWDIFF_TEST_THREADS", "2")))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA
