"""Backends by name.

Backends register themselves with ``@register("name")`` on import. Built-in backends are
imported lazily by :func:`get_backend`, so importing :mod:`detectors` costs nothing and a
backend whose library is missing only fails when chosen.
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from detectors.base import Detector

_REGISTRY: dict[str, type[Detector]] = {}
# Built-in backends: name -> module that registers it when imported.
_BUILTIN_MODULES = {
    "torchvision": "detectors.torchvision_backend",
    # Imports Detectron2: without it, choosing this backend raises ImportError with the install command.
    "detectron2": "detectors.detectron2_backend",
}

D = TypeVar("D", bound=type[Detector])


def register(name: str) -> Callable[[D], D]:
    """Class decorator: make a :class:`Detector` subclass available as ``name``."""

    def deco(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"{cls!r} is not a Detector subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"detector backend {name!r} is already registered ({existing.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_backends() -> list[str]:
    """Names that :func:`get_backend` accepts (registered or built in)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def get_backend(name: str) -> Detector:
    """A new instance of the backend called ``name``.

    Raises:
        KeyError: no such backend (the message lists the known ones).
        ImportError: a built-in backend whose library is missing (the message says how to install it).
    """
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown detector backend {name!r}; known: {available_backends()}")
    return _REGISTRY[name]()
