"""The exceptions composer_shear raises for a user's mistake (each names the bad key, field or file)."""

from __future__ import annotations

__all__ = ['ConfigError', 'ExportError', 'ShapeError']


class ConfigError(ValueError):
    """A bad YAML key or argument value (an unknown key, a value out of range, inconsistent settings)."""


class ShapeError(ValueError):
    """A model or target shape that cannot be pruned as asked."""


class ExportError(RuntimeError):
    """A checkpoint or output folder that export cannot use."""
