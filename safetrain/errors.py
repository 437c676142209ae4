"""What a user meets when safetrain stops: each says the setting or file, the value, why, and the fix."""


class SafetrainError(Exception):
    """Base class of safetrain's own stops."""

    resumable = False  # whether `python -m safetrain resume=RUN_DIR` can go on from the last complete epoch


class ConfigError(SafetrainError):
    """A setting that cannot work (names the key, the value, the reason and the fix). Raised before training."""


class DataError(SafetrainError):
    """Data that cannot be trained on as given (names the file or folder and the fix). Raised before training."""


class Interrupted(SafetrainError):
    """SIGINT or SIGTERM: training stopped after the current step; the last complete epoch's checkpoint is kept."""

    def __init__(self, message: str, signal_number: int, resumable: bool = True):
        super().__init__(message)
        self.exit_code = 128 + signal_number  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
        self.resumable = resumable  # False before the run directory was written: the command is simply run again

    def __reduce__(self):  # rebuilt whole on the other ranks of a distributed run
        return Interrupted, (str(self), self.exit_code - 128, self.resumable)


class TrainingStopped(SafetrainError):
    """The run was stopped on purpose (divergence, non-finite values: resuming would do the same again) or could
    not write its checkpoint (resumable once there is space); the last good checkpoint is kept."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class Pruned(TrainingStopped):
    """mode=tune: the search stopped this trial after an epoch whose validation metric lagged the earlier trials' at
    that epoch (safetrain/tune.py); its checkpoints stay, and resuming trains it to its end."""

    def __init__(self, message: str):
        super().__init__(message, resumable=True)


def check_range(key: str, value, lo, hi, row: str = "config", fix: str = "") -> None:
    """Refuse a setting outside [lo, hi], naming the key, the value and the range (and a fix, if given)."""
    if not lo <= value <= hi:
        raise ConfigError(f"[{row}] {key}={value} is outside [{lo}, {hi}].{fix}")
