"""Errors raised by ota_trainer.

Every error derives from :class:`OTAError` and from the builtin that fits it, so callers can
catch either. Each carries the offending file, repo or tensor as attributes and says how to
fix the problem in its message.
"""
from __future__ import annotations


class OTAError(Exception):
    """Root of all ota_trainer errors."""


class ConfigError(OTAError, ValueError):
    """A recipe, option or command-line flag is invalid (unknown method, density out of range...)."""


class FormatError(OTAError, ValueError):
    """A file on disk is not what it claims to be: corrupt safetensors, bad moments metadata.

    Attributes:
        path: the offending file, when known.
    """

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class IncompatibleModelsError(OTAError, ValueError):
    """Base, experts and moments do not line up (names, shapes, architectures).

    Attributes:
        tensor: the tensor name concerned, when there is one.
        model: the model (folder or repo id) concerned.
    """

    def __init__(self, message: str, *, tensor: str | None = None, model: str | None = None):
        super().__init__(message)
        self.tensor = tensor
        self.model = model


class MissingMomentsError(IncompatibleModelsError):
    """An expert has no second moments for a parameter the chosen method needs."""


class NumericalError(OTAError, ValueError):
    """NaN, Inf or negative second moments found in an input tensor."""

    def __init__(self, message: str, *, tensor: str | None = None, model: str | None = None):
        super().__init__(message)
        self.tensor = tensor
        self.model = model


class OutputExistsError(OTAError, FileExistsError):
    """The output folder exists and is not empty; pass ``overwrite=True`` (``--overwrite``)."""


class CaptureError(OTAError, RuntimeError):
    """Second moments could not be read from the optimizer."""


class HubError(OTAError, OSError):
    """A Hub operation failed (unknown repo or revision, no access, offline with empty cache).

    Attributes:
        repo_id: the repository concerned.
    """

    def __init__(self, message: str, *, repo_id: str | None = None):
        super().__init__(message)
        self.repo_id = repo_id
