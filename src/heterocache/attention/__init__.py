"""Attention over the ragged store: the decode plan (host decisions), the decode step and the
extend (later turn) paths, and the decode kernels (``kernels``)."""
