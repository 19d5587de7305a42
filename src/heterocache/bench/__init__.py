"""Measuring: decode speed and memory per method and context (``measure``), the ``heterocache
bench`` command (``cli``), and decode-step diagnostics (``diagnostics``: host reads, step counts)."""
