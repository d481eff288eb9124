"""dataengine: web image-text pairs in, curated multimodal datasets out, on Ray."""

__version__ = "0.1.0"
