"""Detectron2 Mask R-CNN backend (``backend: detectron2``), used when Detectron2 is installed.

Importing this module imports Detectron2; without it the import fails at once with the
install command (the registry imports this module only when the backend is chosen).

Layout written to ``out_dir`` (the torchvision backend's): ``model_final.pth``
(``{"model", "meta"}``), ``last_checkpoint.pth`` (full training state, for resume),
``train_log.json`` (per-iteration losses and lr) and, with ``cfg.eval_json``,
``eval_metrics.json`` (COCOEvaluator / LVISEvaluator results as fractions in [0, 1]); and
what Detectron2 users expect there: ``metrics.json``, ``last_checkpoint`` and TensorBoard
events (see :mod:`detectors.detectron2_backend.trainer`).

:func:`register_run` registers a run folder's training labels (and a val json) in
Detectron2's catalogs for a user's own config (``docs/detectron2.md``).
"""
from __future__ import annotations

INSTALL_HINT = (
    "the 'detectron2' detector backend needs Detectron2, which is not on PyPI. Install it from "
    "source: pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
    "(or from a clone: pip install --no-build-isolation -e ./detectron2), and its pure-python "
    "dependencies with pip install 'exits[detectron2]'"
)

try:
    # `import detectron2` first and on its own: it fails even when submodules are cached.
    import detectron2  # noqa: F401
    import detectron2.config  # noqa: F401
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
except ImportError as exc:  # missing Detectron2, or a missing dependency of it (fvcore, iopath...)
    raise ImportError(f"{INSTALL_HINT}. Import failed with: {exc}") from exc

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from detectors.base import Detector, ImagesArg, PathLike, training_meta
from detectors.config import DetectorConfig
from detectors.detectron2_backend.datasets import register_coco_json
from detectors.detectron2_backend.predict import predict_images
from detectors.detectron2_backend.registration import RegisteredRun, register_run
from detectors.detectron2_backend.settings import build_detectron2_cfg
from detectors.detectron2_backend.trainer import train_detectron2
from detectors.registry import register

log = logging.getLogger(__name__)


@register("detectron2")
class Detectron2Detector(Detector):
    """Mask R-CNN from Detectron2 (R50-FPN built in, or any Detectron2 yaml)."""

    def train(self, train_json: PathLike, image_dir: PathLike, cfg: DetectorConfig, out_dir: PathLike) -> Path:
        with open(train_json, "r", encoding="utf-8") as fh:
            data = json.load(fh)
        box_source = cfg.box_source
        train_set = register_coco_json(data, train_json, image_dir, "train", box_source=box_source)
        eval_set = None
        if cfg.eval_json is not None:
            with open(cfg.eval_json, "r", encoding="utf-8") as fh:
                gt = json.load(fh)
            # GT boxes come from the GT masks' json bbox as COCO defines them; the evaluator
            # reads the json file itself, the dicts only drive the test loader.
            eval_set = register_coco_json(gt, cfg.eval_json, cfg.eval_image_dir or image_dir, "eval",
                                          category_ids=train_set.category_ids, box_source="annotation")
        log.info("detectron2: training on %d images, %d objects, %d categories",
                 train_set.num_images, train_set.num_objects, len(train_set.category_ids))
        d2cfg = build_detectron2_cfg(cfg, len(train_set.category_ids), train_set.name,
                                     eval_set.name if eval_set else None, out_dir)
        meta = {**training_meta(self.name, data, train_json, train_set.category_ids, train_set.dropped),
                "config": cfg.to_dict()}
        return train_detectron2(d2cfg, cfg, out_dir, meta, eval_json=cfg.eval_json)

    def predict(
        self,
        checkpoint: PathLike,
        image_dir: PathLike,
        images: ImagesArg,
        cfg: DetectorConfig,
        image_ids: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        return predict_images(checkpoint, image_dir, images, cfg, image_ids)


__all__ = ["Detectron2Detector", "INSTALL_HINT", "RegisteredRun", "register_run"]
