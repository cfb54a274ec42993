"""Errors the engine raises for bad input, before anything is queued."""


class InvalidRequestError(ValueError):
    """A request field is wrong; the message names the field and the allowed range."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownModelError(ValueError):
    """The model name is neither built in nor a path we can load."""


class UnknownAdapterError(ValueError):
    """The adapter id names no adapter this engine knows (NOT_FOUND); nothing was queued."""
