"""Fixtures of the interop tests: random transformers checkpoints saved to tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_models import build_hf_model


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """``make(name) -> (hf_model, folder)``: a random transformers model saved with save_pretrained."""

    def make(name: str, seed: int = 0) -> tuple[torch.nn.Module, Path]:
        model = build_hf_model(name, seed)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return model, folder

    return make
