"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class PosttrainError(Exception):
    """Base class: the message is meant for the user, not for a debugger."""


class ConfigError(PosttrainError):
    """The configuration is invalid (unknown key, wrong type, impossible combination)."""


class DataError(PosttrainError):
    """A data file or row is unusable. The message names the file, line (or row) and field."""

    def __init__(self, message: str, location: str | None = None, field: str | None = None):
        self.location = location
        self.field = field
        where = location or ""
        if field:
            where = f"{where}: field '{field}'" if where else f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
