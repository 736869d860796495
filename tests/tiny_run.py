"""A run folder with demo data, its instances table and untrained tiny models (fixed seed):
enough for the stages 1b / 1d to run in a second. Shared by test modules (not a test file)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

# A ViT of one block on 32 px crops: stage 1b / 1d in well under a second per object.
TINY_MODEL = [
    "device=cpu", "data.crop_size=32", "backbone.img_size=32", "backbone.patch_size=8", "backbone.depth=1",
    "backbone.embed_dim=32", "backbone.num_heads=2", "backbone.decoder_dim=16",
    "retrieval.delta_px=2", "retrieval.batch_size=4", "pseudo.batch_size=4",
]


def build_tiny_run(root: Path, overrides: Sequence[str], n_train: int = 4):
    """``generate_demo_dataset(n_train, seed 3, 96 x 128)`` under ``root/demo``, a run folder
    ``root/run`` with its run files and instances table, and random-init similarity extractor
    and generator (torch seed 0). Returns (config, RunFolder, images folder)."""
    from exits.config import dump_config, load_config
    from exits.demo.dataset import generate_demo_dataset
    from exits.models import save_mask_model
    from exits.pipeline import stage_prepare
    from exits.run_folder import RunFolder
    from exits.stages.common import model_from_config

    generate_demo_dataset(root / "demo", n_train=n_train, n_val=1, seed=3, image_size=(96, 128))
    cfg = load_config("demo", TINY_MODEL + list(overrides))
    run = RunFolder(root / "run")
    images, ann = root / "demo" / "images", root / "demo" / "instances.json"
    run.write_run_files(dump_config(cfg), images, ann, None)
    stage_prepare(cfg, ann, images, run.root, progress=False)
    torch.manual_seed(0)
    save_mask_model(run.similarity, model_from_config(cfg.backbone))
    save_mask_model(run.generator, model_from_config(cfg.backbone))
    return cfg, run, images
