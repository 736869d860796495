"""The official LVIS API over a dataset already in memory.

lvis 0.5.3's ``LVIS`` only takes a path; reading a 1.27M-annotation file twice (once for
validation, once for the API) costs tens of seconds, so this subclass also accepts the
parsed dict; a path is opened with :func:`exits.io.json_stream.open_json_text`, as the
annotation reader does. Nothing else of the API changes.
"""
from __future__ import annotations

import json
from typing import Any

from lvis import LVIS

from exits.io.json_stream import open_json_text


class InMemoryLVIS(LVIS):
    def _load_json(self, path: Any) -> dict:
        if isinstance(path, dict):
            return path
        # the project's one way of opening a json file (gzip, UTF-8/16/32, BOM)
        with open_json_text(path) as fh:
            return json.load(fh)


def lvis_from_dict(dataset: dict) -> LVIS:
    return InMemoryLVIS(dataset)
