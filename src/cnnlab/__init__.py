"""cnnlab: train, compare, tune, understand and ship convolutional image classifiers."""
__version__ = "0.1.0"
