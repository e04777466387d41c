"""cnnlab's version, written into every run folder and export."""
__version__ = "0.1.0"
