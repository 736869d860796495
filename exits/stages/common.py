"""Small pieces the stage-1 stages share: model construction from the config section and
training settings from an optimiser section (plain values in, plain objects out)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from exits.config.loading import ConfigError
from exits.config.schema import BackboneConfig, OptimConfig
from exits.engine import TrainSettings
from exits.models import build_mask_model
from exits.models.mask_model import MaskModel


def require_backbone_weights(backbone: BackboneConfig) -> None:
    """Raise :class:`ConfigError` (one line: what is missing, how to go on) before a training
    stage starts a large ViT from random init that the config does not allow."""
    refusal = backbone.random_init_refusal()
    if refusal:
        raise ConfigError(refusal)


def model_from_config(backbone: BackboneConfig) -> MaskModel:
    return build_mask_model(
        backbone.vit_name, img_size=backbone.img_size, patch_size=backbone.patch_size, depth=backbone.depth,
        embed_dim=backbone.embed_dim, num_heads=backbone.num_heads, conv_stem=backbone.conv_stem,
        decoder_dim=backbone.decoder_dim, image_skip=backbone.image_skip, pretrained_path=backbone.pretrained_path,
    )


def train_settings(optim: OptimConfig, *, seed: int, device: str, amp: bool, checkpoint_dir: Path | None,
                   ema_decay: float | None = None, ema_warmup: bool = False, **extra: Any) -> TrainSettings:
    return TrainSettings(
        epochs=optim.epochs, batch_size=optim.batch_size, lr=optim.lr, weight_decay=optim.weight_decay,
        warmup_epochs=optim.warmup_epochs, grad_clip=optim.grad_clip, seed=seed, device=device, amp=amp,
        ema_decay=ema_decay, ema_warmup=ema_warmup, num_workers=optim.num_workers, max_steps=optim.max_steps,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None, **extra,
    )
