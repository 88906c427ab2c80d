"""Typed stage configuration: YAML + `extends:` + dotted overrides, validated by pydantic."""

from megaflow.config.loader import ConfigError, dump_config, load_config, load_yaml_tree
from megaflow.config.schema import ModelConfig, ParallelConfig, StageConfig

__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "StageConfig", "dump_config", "load_config", "load_yaml_tree"]
