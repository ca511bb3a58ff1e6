"""One exception type for user-facing failures.

Anything raised as HarmsweepError is a problem with the user's input or environment (bad override,
missing file, unavailable checkpoint); the CLI prints its message as one line and exits non-zero.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class HarmsweepError(Exception):
    """A user-facing error whose message fits on one line and says what to do."""


class DataError(HarmsweepError):
    """A dataset file is missing, empty or malformed."""


EXIT_USAGE = 2  # the exit status of every refused command: bad input, found before any work


def exit_usage(message: str, prog: str = "harmsweep") -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with EXIT_USAGE."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
