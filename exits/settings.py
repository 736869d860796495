"""Base of the frozen dataclasses that hold a component's plain settings (the detector's,
the click model's): validated copies, strict loading from a mapping, JSON-able dumps.

The run config (:mod:`exits.config`) embeds these dataclasses as typed sections, so YAML,
the CLI and Python callers all build the same validated object.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

S = TypeVar("S", bound="FrozenSettings")


class FrozenSettings:
    """Mixin for ``@dataclass(frozen=True)`` settings whose ``__post_init__`` validates."""

    def replace(self: S, **changes: Any) -> S:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Field values with tuples as lists (JSON / YAML friendly)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any]) -> S:
        """Build from a mapping; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**dict(values))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value
