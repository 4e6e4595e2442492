"""Errors a user can cause, in one leaf module that everything may import (it imports nothing).

Each carries one sentence that names the offending value and the fix. The CLI turns any
UserError into `error: <sentence>` and exit status 2; anything else is a bug and keeps its
traceback.
"""


class UserError(ValueError):
    """Base of every user-caused error; its message is one sentence naming the value and the fix."""


class ConfigError(UserError):
    """A configuration key has a wrong type or an impossible value."""


class LayoutError(ConfigError):
    """The parallel layout (tp x pp x dp, schedule, ZeRO) does not fit the model or the job."""


class DataError(UserError):
    """Missing or corrupt data files, or sources that cannot be read."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or does not fit the model being built."""


class LaunchError(UserError):
    """The run environment (ranks, world size, rendezvous) is inconsistent."""


class TrainingError(UserError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


class UsageError(UserError):
    """A command-line argument outside the range a command accepts."""


class PeerFailure(RuntimeError):
    """Another rank died or stalled: a collective failed or timed out. Not the user's doing, so the
    CLI prints it as one line with exit status 1 (a failure a launcher may restart)."""
