"""Training engine shared by EXITS stage 1a and 1c: plain loop, EMA teacher, LR schedule,
atomic checkpoints with exact resume, and DDP under ``torchrun``."""
from exits.engine.checkpoint import LAST_CHECKPOINT, load_checkpoint, save_checkpoint
from exits.engine.device import move_to_device, resolve_device
from exits.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from exits.engine.ema import ModelEMA, unwrap_model
from exits.engine.loop import TrainResult, TrainSettings, TrainTask, seed_everything, train
from exits.engine.optim import build_optimizer, param_groups_weight_decay
from exits.engine.schedule import build_scheduler, lr_at

__all__ = [
    "LAST_CHECKPOINT",
    "DistInfo",
    "ModelEMA",
    "TrainResult",
    "TrainSettings",
    "TrainTask",
    "build_optimizer",
    "build_scheduler",
    "cleanup_distributed",
    "init_distributed",
    "load_checkpoint",
    "lr_at",
    "move_to_device",
    "param_groups_weight_decay",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train",
    "unwrap_model",
]
