"""Errors raised by ota_trainer.

Every error derives from :class:`OTAError` and from the builtin that fits it, so callers can
catch either. Each carries the offending file, repo or tensor as attributes and says how to
fix the problem in its message.
"""

from __future__ import annotations

import reprlib

# Messages quote values from recipes and files that strangers wrote: quoted through brief(),
# bounded in depth, items and length, so a 1 KB recipe of nested YAML aliases (a structure that
# expands to 10^9 items) or a 100 MB tensor name cannot stall or flood the error path.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 3
_BRIEF.maxdict = _BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxset = _BRIEF.maxfrozenset = _BRIEF.maxdeque = 4
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlong = 40
MAX_MESSAGE_VALUE = 160


def brief(value: object, limit: int = MAX_MESSAGE_VALUE) -> str:
    """``repr(value)`` for an error message, bounded: at most ``limit`` characters, built without
    expanding more than a few levels and items of nested data. Never raises."""
    try:
        text = _BRIEF.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int beyond Python's digit limit
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("\n", " ").replace("\r", " ")


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


class OutputError(OTAError, OSError):
    """The output folder cannot be written: its parent is a file, it is read-only, the disk is
    full, another merge is writing it, or it changed while the merge ran.

    Attributes:
        path: the folder or file concerned.
        kept: where a finished merge was kept instead, when it could not be put at ``--out``.
    """

    def __init__(self, message: str, *, path: str | None = None, kept: str | None = None):
        super().__init__(message)
        self.path = path
        self.kept = kept

    def __str__(self) -> str:  # OSError's own __str__ would show its (errno, strerror) form
        return self.args[0] if self.args else ""


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
