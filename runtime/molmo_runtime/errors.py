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


def install_command(extra: str) -> str:
    """The pip command that adds `extra` to this install. molmo-export is installed from a
    checkout or a wheel (it is not on a package index), so name the checkout when we run from one."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # <checkout>/runtime/molmo_runtime/errors.py
    if (root / "pyproject.toml").is_file() and (root / "molmo_export").is_dir():
        return f"pip install '{root}[{extra}]'"
    return f"pip install '<molmo-export checkout or wheel>[{extra}]'"


def require(module: str, extra: str, what: str = "") -> object:
    """Import `module` lazily; if missing raise one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        purpose = f" (needed for {what})" if what else ""
        raise MissingDependencyError(
            f"{module} is not installed{purpose}: {install_command(extra)}"
        ) from e
