"""User-facing errors: one line saying what was wrong, where, and what to do."""


class ScdError(Exception):
    """An error the CLI prints as a single line (no traceback) before exiting with status 2."""


class ConfigError(ScdError):
    """A configuration key is unknown, missing or of the wrong type."""


class DataError(ScdError):
    """Input data is missing, unreadable or malformed (names file, row and column)."""


class ModelError(ScdError):
    """A model or tokenizer cannot be prepared or does not match."""
