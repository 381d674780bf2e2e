"""Exceptions the library raises; the CLI turns them into one-line messages and a non-zero exit."""


class BlastscanError(Exception):
    """Base class: the message names the file or field at fault and what to do about it."""


class DatasetError(BlastscanError):
    """A dataset folder, manifest or image cannot be used as it is."""


class SplitError(BlastscanError):
    """A split cannot be made, or a split file does not match its manifest."""


class ConfigError(BlastscanError):
    """A configuration key or value is wrong."""


class TrainingError(BlastscanError):
    """Training cannot go on: a NaN loss, an empty class, a leaking split, a damaged checkpoint."""
