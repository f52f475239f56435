"""Errors caused by a client's input. The handler maps them to HTTP 4xx responses."""


class InputError(ValueError):
    """Base class: `type` is a short machine-readable name, `message` says what is wrong."""

    type = "invalid_input"
    http_status = 400

    def __init__(self, message: str, type: str | None = None):
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type


class AudioError(InputError):
    """The audio cannot be decoded, is empty, non-finite, too short or too long, ..."""

    type = "invalid_audio"


class OptionError(InputError):
    """A decoding option (task, beam_size, ...) is unknown or out of range."""

    type = "invalid_option"


class WorkLimitError(InputError):
    """A request asks for more computation than one request may (clips x duration x beam_size x max_pred_size)."""

    type = "request_too_expensive"


class CheckpointError(Exception):
    """A checkpoint is malformed, incomplete or unsafe (not a client error)."""


class UnsafePickleError(CheckpointError):
    """A pickle inside a checkpoint references something other than plain data."""


class NonFiniteResultError(RuntimeError):
    """The model produced a NaN or infinite score or probability. Never returned to a client as a result: JSON has
    no NaN, and such numbers mean the computation broke (the server answers 500 for that request alone)."""
