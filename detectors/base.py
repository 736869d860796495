"""The one interface every stage-2 backend implements.

A backend trains an instance segmenter on a COCO instances json (pseudo labels: compressed
RLE or polygon masks) and predicts COCO results. Evaluation is backend-independent and
lives in :mod:`detectors.evaluation` (:func:`detectors.evaluation.evaluate`).
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from detectors.config import DetectorConfig

PathLike = str | os.PathLike
ImagesArg = PathLike | Sequence[Mapping[str, Any]]
"""A COCO json path (its ``images``) or image records with at least ``id`` and ``file_name``."""


class Detector(abc.ABC):
    """A stage-2 instance segmentation backend."""

    name: str = ""

    @abc.abstractmethod
    def train(self, train_json: PathLike, image_dir: PathLike, cfg: DetectorConfig, out_dir: PathLike) -> Path:
        """Train on ``train_json`` (images under ``image_dir``); return the final checkpoint path.

        Resumes from the last checkpoint in ``out_dir`` when there is one.
        """

    @abc.abstractmethod
    def predict(
        self,
        checkpoint: PathLike,
        image_dir: PathLike,
        images: ImagesArg,
        cfg: DetectorConfig,
        image_ids: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        """COCO results for ``images`` (optionally only ``image_ids``).

        Each result: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
        "segmentation": compressed RLE with str counts}`` in original-image pixels.
        """


def training_meta(backend: str, data: Mapping[str, Any], train_json: PathLike, category_ids: Sequence[int],
                  dropped: Mapping[str, int]) -> dict[str, Any]:
    """What every backend stores with its checkpoints about the data it trained on (so
    ``predict`` maps labels back to category ids and a resume can check it is the same data)."""
    return {
        "backend": backend,
        "category_ids": list(category_ids),
        "categories": data.get("categories", []),
        "train_json": str(train_json),
        "dropped_annotations": dict(dropped),
    }


def read_image_records(images: ImagesArg, image_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Image records (``id``, ``file_name``) from a json path or a sequence, filtered by id.

    LVIS images have no ``file_name``: the last part of ``coco_url`` is used, as the LVIS
    tools do.
    """
    import json

    if isinstance(images, (str, os.PathLike)):
        from exits.io.json_stream import open_json_text

        with open_json_text(images) as fh:
            records = json.load(fh)["images"]
    else:
        records = list(images)
    out = []
    for img in records:
        rec = dict(img)
        if "file_name" not in rec and "coco_url" in rec:
            rec["file_name"] = str(rec["coco_url"]).rsplit("/", 1)[-1]
        if "id" not in rec or "file_name" not in rec:
            raise ValueError(f"image record {img!r:.120} lacks 'id' or 'file_name'")
        out.append(rec)
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        missing = wanted - {int(r["id"]) for r in out}
        if missing:
            raise ValueError(f"image ids not in the image list: {sorted(missing)[:10]}")
        out = [r for r in out if int(r["id"]) in wanted]
    return out
