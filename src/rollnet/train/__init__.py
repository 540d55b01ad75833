"""Training and evaluation: configs, the trainer loop, checkpoints, Table-1 reports.

>>> import tempfile
>>> from rollnet.train import TrainConfig, apply_overrides, train
>>> cfg = apply_overrides(TrainConfig(), ["data.name=rings", "data.n=200", "model.hidden=[8]",
...                                       "epochs=1", "progress=false", "val_margin_samples=0"])
>>> train(cfg, tempfile.mkdtemp(), log=lambda m: None).status
'finished'
"""

from rollnet.train.checkpoint import Checkpoint, CheckpointError, load_manifest
from rollnet.train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RollConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    valid_keys,
)
from rollnet.train.evaluation import (
    RegionReport,
    evaluate_checkpoint,
    region_report,
    to_json,
    to_markdown,
)
from rollnet.train.factory import DataInfo
from rollnet.train.load import LoadedModel, load_model
from rollnet.train.trainer import TrainerState, TrainingDiverged, TrainResult, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataInfo",
    "LoadedModel",
    "ModelConfig",
    "OptimConfig",
    "RegionReport",
    "RollConfig",
    "TrainConfig",
    "TrainResult",
    "TrainerState",
    "TrainingDiverged",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "evaluate_checkpoint",
    "load_config",
    "load_manifest",
    "load_model",
    "region_report",
    "to_json",
    "to_markdown",
    "train",
    "valid_keys",
]
