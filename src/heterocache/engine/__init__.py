"""The engine: ``RaggedCache`` (the transformers cache driven by a policy), its registration with
transformers (the ``heterocache`` attention), the method registry, and what they need to serve a
model exactly (supported architectures, RoPE, tensor-parallel shards, memory accounting)."""
