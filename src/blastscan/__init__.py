"""blastscan: a repeatable deep-learning pipeline for leukemia detection in blood smear images."""

from blastscan.errors import BlastscanError, ConfigError, DatasetError, SplitError

__version__ = "0.1.0"

#: What every exported model card, service answer and web page says about blastscan's models.
DISCLAIMER = "Research use only: not a medical device; every flagged cell must be reviewed by a qualified hematologist."

__all__ = ["DISCLAIMER", "BlastscanError", "ConfigError", "DatasetError", "SplitError", "__version__"]
