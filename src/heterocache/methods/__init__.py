"""The KV-cache methods, one module each: its policy (what each (layer, KV head) keeps and what
happens while decoding), its convenience cache class, and its ``register_method`` call.

Importing this package registers them all, in the order ``list_methods()`` shows them; the registry
(:mod:`heterocache.engine.registry`) imports it on the first look-up. The method modules never import
each other: what several methods share lives in :mod:`heterocache.policy`.
"""

from . import fullkv, streamingllm, h2o, snapkv, pyramidkv, cake, quest, omnikv, shadowkv, heterocache  # noqa: F401, I001
