"""argonne_dt: DTensor tensor-parallel pretraining of the Argonne 2.0 language models."""

from .config import Config, ConfigError, load_config
from .model import ArgonneModel

__all__ = ["ArgonneModel", "Config", "ConfigError", "load_config"]
