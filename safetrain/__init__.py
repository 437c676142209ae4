"""safetrain: image-classifier training whose defaults are correct by construction."""
from safetrain.errors import ConfigError, DataError, SafetrainError, TrainingStopped

__all__ = ["ConfigError", "DataError", "SafetrainError", "TrainingStopped"]
__version__ = "0.1.0"
