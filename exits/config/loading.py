"""Load a YAML config, apply ``key.sub=value`` overrides, validate once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from exits.config.schema import ExitsConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"generator.optim.epochs=3"`` -> (["generator", "optim", "epochs"], 3).

    The value is parsed as YAML, so numbers, booleans, null and lists work as expected.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.sub=value`` override set."""
    out: dict[str, Any] = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def resolve_config_path(path: str | Path | None) -> Path | None:
    """A path as given, or a bare name like ``demo`` looked up in ``configs/``."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if candidate.exists():
        return candidate
    raise ConfigError(f"config file not found: {path} (also looked for {candidate})")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExitsConfig:
    """Read ``path`` (YAML; default: all defaults), apply overrides, validate.

    Raises:
        ConfigError: naming the file and each invalid key.
    """
    resolved = resolve_config_path(path)
    raw: dict[str, Any] = {}
    if resolved is not None:
        try:
            loaded = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{resolved}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, overrides)
    try:
        return ExitsConfig.model_validate(raw)
    except ValidationError as exc:
        where = str(resolved) if resolved else "<defaults>"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: invalid config: {problems}") from exc


def dump_config(cfg: ExitsConfig) -> str:
    """YAML text of a validated config (written into each run folder for provenance)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
