"""Typed errors. Each one carries a message meant for the user: what is wrong and how to fix it.

The CLI prints them as one line; the HTTP layer maps them to status codes in one place.
"""


class MoeError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MoeError):
    """A config value is missing, unknown or out of range."""


class DataError(MoeError):
    """A corpus could not be fetched, verified, read or is empty."""


class ArtifactError(MoeError):
    """An artifact (adapter, router, corpus on disk) is missing, corrupt or does not match the config."""


class UnknownExpertError(MoeError):
    """A name does not match any configured expert."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = sorted(available)
        super().__init__(f"unknown expert {name!r}; available: {self.available}")

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:
        # rebuilt from its fields, not its message: it travels between Ray Serve processes
        return type(self), (self.name, self.available)
