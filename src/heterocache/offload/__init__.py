"""Host memory: per-row host copies of KV (``host_rows``), the satellite heads' host store
(``host_store``) and the asynchronous device <-> host refresh copies (``transfer``)."""
