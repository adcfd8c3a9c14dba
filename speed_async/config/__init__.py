"""Typed config tree, TOML + dotted overrides, validation. Imports neither torch nor vllm."""

from speed_async.config.loader import (
    ALIASES,
    config_from_dict,
    config_to_dict,
    field_docs,
    field_types,
    load_config,
    parse_override,
    write_resolved_config,
)
from speed_async.config.schema import (
    INSTRUCTION_SUFFIX,
    AlgorithmConfig,
    ClusterConfig,
    Config,
    CurriculumConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PipelineConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "ALIASES",
    "INSTRUCTION_SUFFIX",
    "AlgorithmConfig",
    "ClusterConfig",
    "Config",
    "CurriculumConfig",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "RolloutConfig",
    "TrainerConfig",
    "config_from_dict",
    "config_to_dict",
    "field_docs",
    "field_types",
    "load_config",
    "parse_override",
    "write_resolved_config",
]
