"""One pydantic schema for a run: loaded from YAML, overridden with dotted keys, validated once.

Everything downstream takes the validated sub-config it needs and trusts it. Paths are made absolute
here so that Ray workers, whose working directory differs from the driver's, see the same files.

Which file holds what (import the names from `mdpo_ray.config`, which re-exports them):
  model_data.py  the sections a run starts from: model (and model.lora), data, builtin; the strict base
                 of every section and BUILTIN
  training.py    the sections of how it trains and what it writes: loss, optim, scaling, checkpoint, export,
                 tracking, eval, stop, iterate (and import_function, for iterate.verifier)
  run.py         RunConfig: the top-level keys, the checks across sections, the derived numbers
  load.py        ConfigError, YAML + --set overrides -> a validated RunConfig (paths made absolute, errors
                 named by key), the output_dir storage check, to_yaml and flatten
"""

# `name as name`: each is re-exported, so the names keep the import path they had as one module
from mdpo_ray.config.load import RAY_RUNTIME_RESOURCES as RAY_RUNTIME_RESOURCES
from mdpo_ray.config.load import ConfigError as ConfigError
from mdpo_ray.config.load import check_storage_outlives_job as check_storage_outlives_job
from mdpo_ray.config.load import flatten as flatten
from mdpo_ray.config.load import is_jinja as is_jinja
from mdpo_ray.config.load import load_config as load_config
from mdpo_ray.config.load import parse_override as parse_override
from mdpo_ray.config.load import set_dotted as set_dotted
from mdpo_ray.config.load import to_yaml as to_yaml
from mdpo_ray.config.load import validate_config as validate_config
from mdpo_ray.config.model_data import BUILTIN as BUILTIN
from mdpo_ray.config.model_data import BuiltinTaskConfig as BuiltinTaskConfig
from mdpo_ray.config.model_data import DataConfig as DataConfig
from mdpo_ray.config.model_data import LoraConfig as LoraConfig
from mdpo_ray.config.model_data import ModelConfig as ModelConfig
from mdpo_ray.config.run import RunConfig as RunConfig
from mdpo_ray.config.training import CheckpointConfig as CheckpointConfig
from mdpo_ray.config.training import EvalConfig as EvalConfig
from mdpo_ray.config.training import ExportConfig as ExportConfig
from mdpo_ray.config.training import IterateConfig as IterateConfig
from mdpo_ray.config.training import LossConfig as LossConfig
from mdpo_ray.config.training import OptimConfig as OptimConfig
from mdpo_ray.config.training import ScalingConfig as ScalingConfig
from mdpo_ray.config.training import StopConfig as StopConfig
from mdpo_ray.config.training import TrackingConfig as TrackingConfig
from mdpo_ray.config.training import import_function as import_function
