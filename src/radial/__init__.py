"""radial: reproducible pipeline for dynamic-depth (layer-routed) LLMs."""

__version__ = "0.1.0"


