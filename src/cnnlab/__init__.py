"""cnnlab: train, compare, tune, understand and ship convolutional image classifiers."""
from cnnlab.core.version import __version__

__all__ = ["__version__"]
