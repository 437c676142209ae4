"""safetrain: image-classifier training whose defaults are correct by construction."""
from safetrain.errors import ConfigError, DataError, SafetrainError

__all__ = ["ConfigError", "DataError", "SafetrainError"]
__version__ = "0.1.0"
