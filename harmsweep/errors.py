"""One exception type for user-facing failures.

Anything raised as HarmsweepError is a problem with the user's input or environment (bad override,
missing file, unavailable checkpoint); the CLI prints its message as one line and exits non-zero.
Any other exception is a bug and keeps its traceback.
"""


class HarmsweepError(Exception):
    """A user-facing error whose message fits on one line and says what to do."""


class DataError(HarmsweepError):
    """A dataset file is missing, empty or malformed."""
