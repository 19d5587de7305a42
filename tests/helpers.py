"""Plain helpers the tests import (``from helpers import tiny_model``): tiny random models built
from configs, the benchmark scripts as modules, an uncompressed reference generation. The fixtures
live in ``conftest.py``; ``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import heterocache  # noqa: F401  (registers the attention)
from heterocache._compat import cache_kwarg

TINY = dict(
    vocab_size=256,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_model(arch: str = "llama", attn: str = "heterocache", seed: int = 0, **overrides):
    """A random-weight model of the given family (fp32, eval mode)."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    config._attn_implementation = attn
    model = model_cls(config).eval()
    return model


def benchmark_module(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dynamic_reference(shape: dict, L: int = 90, pad: tuple[int, int] = (1, 11), new_tokens: int = 12, seed: int = 0):
    """A left-padded batch of two rows (row ``pad[0]`` padded by ``pad[1]`` tokens) and its greedy
    tokens with transformers' DynamicCache and SDPA: ``(model with heterocache attention,
    input ids, generate kwargs, reference tokens)``, the oracle of an uncompressed cache."""

    model = tiny_model("llama", **shape)
    ref_model = tiny_model("llama", attn="sdpa", **shape)
    ids = torch.randint(1, 256, (2, L), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[pad[0], : pad[1]] = 0
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return model, ids, kw, ref_model.generate(ids, **cache_kwarg(ref_model, DynamicCache()), **kw)


class RecordingCache(DynamicCache):
    """Remembers how many new tokens each call to layer 0's update brought."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self.chunks.append(key_states.shape[-2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
