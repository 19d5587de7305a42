"""Host memory: the KV that methods keep off the device (``host_kv``: HeteroCache's host copies,
OmniKV's offloaded context, ShadowKV's values) and the one asynchronous host-to-device path
(``transfer``)."""
