"""Errors that carry what was wrong and where, shared by every part of emoe."""


class EmoeError(Exception):
    """Base class: a failure a user can act on. The message says what and where.

    Pickled by message and attributes (not by constructor arguments), so an error raised in a
    worker process reaches the parent intact whatever its subclass's ``__init__`` takes.
    """

    def __reduce__(self):
        return _rebuild, (type(self), str(self), self.__dict__)


def _rebuild(cls: type, message: str, attributes: dict) -> "EmoeError":
    error = Exception.__new__(cls)
    error.args = (message,)
    error.__dict__.update(attributes)
    return error


class ConfigError(EmoeError):
    """A bad configuration value: names the field (or file:field) and what is accepted."""


class UnknownNameError(ConfigError):
    """An unknown policy, preset or task name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: "list[str] | tuple[str, ...]",
                 where: str = ""):
        self.kind, self.name, self.valid, self.where = kind, name, sorted(valid), where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}unknown {kind} {name!r}; valid: {', '.join(self.valid)}")


class TraceFormatError(EmoeError):
    """A malformed trace: names the file, the line and the column."""

    def __init__(self, path: str, line: int, column: str, problem: str):
        self.path, self.line, self.column, self.problem = path, line, column, problem
        super().__init__(f"{path}:{line}: column {column!r}: {problem}")


class RequestError(EmoeError):
    """A malformed or conflicting request: names the request id and the field."""
