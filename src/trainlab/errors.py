"""The two kinds of failure a user sees, each with its exit code.

`UsageError` is input the user can fix (config, path, argument, checkpoint): the CLI prints its
one-line message and exits 2 before anything is written.  `TrainingStopped` ends a run that
started: a health policy or a training failure, exit 1, after state was saved where possible.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_STOPPED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def brief(exc: BaseException | str, limit: int | None = 120) -> str:
    """An exception's message (or any text) on one line, whitespace runs collapsed, at most `limit`
    characters (None: all of it): what a one-line refusal quotes of the error beneath it.  The one
    place this is done -- every one-line message in trainlab goes through it."""
    return " ".join(str(exc).split())[:limit]


class UsageError(Exception):
    """Bad input a user can cause. The message is one line naming what is wrong and what is allowed."""


class ConfigError(UsageError):
    """A config value or key is wrong; `key` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config {key}: {message}" if key else f"config: {message}")


class TrainingStopped(Exception):
    """The run stopped before its last step for a reason the message gives (exit code 1)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the checkpoint is saved.  `exit_code` is 130 or 143."""

    def __init__(self, signal_name: str, exit_code: int):
        self.signal_name = signal_name
        self.exit_code = exit_code
        super().__init__(f"stopped by {signal_name}")
