"""Host memory: per-row host copies of KV read by indices (``host_rows``), an offloaded layer's
context (``host_context``), the satellite heads' host store (``host_store``) and the asynchronous
device <-> host refresh copies (``transfer``)."""
