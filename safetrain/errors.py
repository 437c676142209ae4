"""The two exceptions a user meets: both say the setting or file, the value, why, and the fix."""


class SafetrainError(Exception):
    """Base class: a refusal that stops a run before any training step."""


class ConfigError(SafetrainError):
    """A setting that cannot work (names the key, the value, the reason and the fix)."""


class DataError(SafetrainError):
    """Data that cannot be trained on as given (names the file or folder and the fix)."""
