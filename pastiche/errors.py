"""Errors that reach the user as one sentence and exit code 2 (bad input, not a bug)."""


class PasticheError(Exception):
    """Bad input or an unusable artifact: the CLI prints the message and exits 2."""

    exit_code = 2


class ConfigError(PasticheError):
    """A flag or config-file value is out of range or of the wrong kind."""
