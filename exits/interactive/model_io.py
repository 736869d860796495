"""Saving and loading the click model: WORKDIR/click_model/model.pt.

The file holds everything needed to rebuild the decoder (its config dict, the encoder's
token width, the state dict) and to find the encoder it was trained on: the generator
checkpoint path relative to the run folder plus its crop size. Written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from exits.interactive.config import ClickModelConfig
from exits.interactive.decoder import ClickDecoder
from exits.io import atomic_path
from exits.run_folder import RunFolder

__all__ = ["CLICK_MODEL_PATH", "GENERATOR_PATH", "save_click_model", "load_click_model"]

# Relative to the run folder (the model file stores the encoder's path this way, so a run
# folder can be moved).
CLICK_MODEL_PATH = RunFolder(".").click_model.relative_to(".")
GENERATOR_PATH = RunFolder(".").generator.relative_to(".")
FORMAT_VERSION = 2  # 2: 8 input map channels (previous mask), coarse + zoom passes, new parts


def save_click_model(path: str | os.PathLike, decoder: ClickDecoder, *, encoder_path: str, crop_size: int,
                     extra: dict[str, Any] | None = None) -> Path:
    payload = {
        "format_version": FORMAT_VERSION,
        "config": decoder.config.to_dict(),
        "embed_dim": decoder.embed_dim,
        "state_dict": decoder.state_dict(),
        "encoder_path": str(encoder_path),
        "crop_size": int(crop_size),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_click_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ClickDecoder, dict[str, Any]]:
    """(decoder in eval mode on ``device``, the payload without the state dict)."""
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported click model format {payload.get('format_version')}")
    decoder = ClickDecoder(ClickModelConfig.from_dict(payload["config"]), int(payload["embed_dim"]))
    decoder.load_state_dict(payload.pop("state_dict"), strict=True)
    return decoder.to(device).eval(), payload
