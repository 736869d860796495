"""Run configuration: typed schema and YAML loading with overrides."""
from exits.config.loading import ConfigError, dump_config, load_config
from exits.config.schema import ExitsConfig

__all__ = ["ConfigError", "ExitsConfig", "dump_config", "load_config"]
