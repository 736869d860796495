"""Stage 2: instance segmenters (Mask R-CNN) trained on pseudo labels, behind one interface.

- :mod:`detectors.config`: :class:`DetectorConfig`, the plain-value settings of a backend.
- :mod:`detectors.base`: the :class:`Detector` interface (train / predict).
- :mod:`detectors.registry`: backends by name (``get_backend("torchvision")``).
- :mod:`detectors.evaluation`: COCO bbox/segm AP, LVIS AP and AP on separated objects.
"""
from detectors.base import Detector
from detectors.config import DetectorConfig
from detectors.registry import available_backends, get_backend, register

__all__ = ["Detector", "DetectorConfig", "available_backends", "get_backend", "register"]
