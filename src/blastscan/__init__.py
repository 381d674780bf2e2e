"""blastscan: a repeatable deep-learning pipeline for leukemia detection in blood smear images."""

from blastscan.errors import BlastscanError, ConfigError, DatasetError, SplitError

__version__ = "0.1.0"

__all__ = ["BlastscanError", "ConfigError", "DatasetError", "SplitError", "__version__"]
