"""One base exception for the project, one per subsystem, subclasses named for the failure."""

from __future__ import annotations


class EdgetrainError(Exception):
    """Base of every error edgetrain raises on purpose; its message is one line a user can act on."""


class DatasetError(EdgetrainError):
    """A data set could not be found, downloaded, verified or parsed."""


class ChecksumError(DatasetError):
    """A file's content does not match its published checksum."""


class ConfigError(EdgetrainError):
    """Options that cannot work together, or a value out of range."""


class CoresError(ConfigError):
    """A core list that cannot be parsed or names cores this process may not use."""


class WireError(EdgetrainError):
    """A message from the network is malformed: wrong names, shapes, dtypes, lengths or values."""


class NonFiniteError(WireError):
    """A tensor from the network holds NaN or Inf."""
