"""An instances json file (COCO / LVIS / VOC in COCO format) opened and read key by key.

:class:`StreamedInstancesJson` opens the file (:func:`exits.io.json_stream.open_json_text`:
gzip, UTF-8/16/32, BOM), holds its ``images``, ``categories`` and other keys and streams its
``annotations`` one at a time; every way the file can be unusable is one
:class:`exits.data.validation.DatasetError` line naming it. :func:`detect_format` tells
LVIS json from COCO json. The records themselves are validated by
:func:`exits.data.reader.load_point_dataset`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

from exits.data.validation import DatasetError
from exits.io.json_stream import JsonFileError, JsonStreamError, iter_top_level, open_json_text


def detect_format(dataset: dict) -> Literal["coco", "lvis"]:
    """LVIS json has per-category ``frequency`` and images named by ``coco_url``."""
    cats = dataset.get("categories") or []
    if isinstance(cats, list) and cats and all(isinstance(c, dict) and "frequency" in c for c in cats):
        return "lvis"
    images = dataset.get("images") or []
    if (isinstance(images, list) and images and isinstance(images[0], dict)
            and "file_name" not in images[0] and "coco_url" in images[0]):
        return "lvis"
    return "coco"


def _dataset_error(path: Path, exc: JsonStreamError | JsonFileError) -> DatasetError:
    if isinstance(exc, JsonFileError):
        return DatasetError(str(exc))
    if exc.top_level:
        return DatasetError(f"{path}: top level must be an object with images/annotations/categories")
    if not exc.invalid:
        return DatasetError(f"{path}: {exc.detail}")
    return DatasetError(f"{path}: not valid JSON ({exc.detail})")


class StreamedInstancesJson:
    """An instances json read key by key: ``images``, ``categories`` (and every other key)
    whole, ``annotations`` one at a time (:mod:`exits.io.json_stream`), so a COCO-sized file
    never sits in memory as one dict. When ``annotations`` comes before ``images`` or
    ``categories`` in the file, the annotations are held as a list instead. The file is
    opened with :func:`exits.io.json_stream.open_json_text` (gzip, UTF-8/16/32, BOM)."""

    def __init__(self, path: Path):
        self.path = path
        self.head: dict[str, Any] = {}
        self._fh = None
        try:
            self._fh = open_json_text(path)
        except FileNotFoundError as exc:
            raise DatasetError(f"annotation file not found: {path}") from exc
        except JsonFileError as exc:
            raise _dataset_error(path, exc) from None
        self._it = iter_top_level(self._fh, stream="annotations", source=str(path))
        self.annotations: Iterator[Any] | list[Any] | None = None
        try:
            for key, value in self._it:
                if key == "annotations":
                    if not all(isinstance(self.head.get(k), list) for k in ("images", "categories")):
                        value = list(value)  # keys out of the usual order: hold them
                    self.annotations = value
                    if not isinstance(value, list):
                        break
                else:
                    self.head[key] = value
        except (JsonStreamError, JsonFileError) as exc:
            self.close()
            raise _dataset_error(path, exc) from None
        for key in ("images", "categories"):
            if not isinstance(self.head.get(key), list):
                self.close()
                raise DatasetError(f"{path}: missing or non-list '{key}'")
        if self.annotations is None:
            self.close()
            raise DatasetError(f"{path}: missing or non-list 'annotations'")

    def iter_annotations(self) -> Iterator[Any]:
        try:
            yield from self.annotations
            if not isinstance(self.annotations, list):
                for key, value in self._it:  # keys after the annotations (validates the tail)
                    self.head[key] = value
        except (JsonStreamError, JsonFileError) as exc:
            raise _dataset_error(self.path, exc) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
