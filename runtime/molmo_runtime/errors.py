"""Errors users see. Each message says what is wrong and what to do about it."""

from __future__ import annotations


class MolmoError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ArtifactError(MolmoError):
    """An artifact directory is missing a file, was tampered with, or is of another version."""


class InputError(MolmoError, ValueError):
    """Bad user input: an unreadable image, a prompt over the limit, a bad argument."""


class MissingDependencyError(MolmoError, ImportError):
    """An optional dependency (an extra) is not installed."""


class EngineMismatchError(ArtifactError):
    """A TensorRT engine was built for another TensorRT version, GPU or source graph."""


def require(module: str, extra: str, what: str = "") -> object:
    """Import `module` lazily; if missing raise one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        purpose = f" (needed for {what})" if what else ""
        raise MissingDependencyError(
            f"{module} is not installed{purpose}: pip install 'molmo-export[{extra}]'"
        ) from e
