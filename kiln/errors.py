"""User-facing errors: the CLI prints their message as one line and exits 2."""


class KilnError(Exception):
    """A problem the user can fix (bad config, bad input file, missing tool). No traceback."""

    exit_code = 2


class ConfigError(KilnError):
    """An invalid configuration; the message names the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")
