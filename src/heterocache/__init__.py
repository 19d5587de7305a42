"""heterocache: heterogeneous KV-cache compression for Hugging Face transformers."""

__version__ = "0.1.0"
