"""Small objects for tests and examples: a hand-made profile and tiny random-weight models."""

from __future__ import annotations

from typing import Any

import torch

from .clustering import budget_ratios
from .head_profile import HeadProfile
from .roles import Role


def toy_profile(**overrides: Any) -> HeadProfile:
    """A valid 3-layer × 4-KV-head profile (8 query heads, head_dim 16) with every role::

        layer 0:  P   S0  S0  A
        layer 1:  V   P   S1  A
        layer 2:  S3  V   A   P

    Keyword arguments replace constructor arguments (tensors or metadata).
    """
    roles = torch.tensor([[3, 4, 4, 1], [2, 3, 4, 1], [4, 2, 1, 3]])
    stability = torch.tensor([[0.9, 0.8, 0.4, 0.7], [0.2, 0.6, 0.5, 0.55], [0.3, 0.1, 0.95, 0.45]])
    fields: dict[str, Any] = dict(
        roles=roles,
        stability=stability,
        budget_ratios=budget_ratios(roles, stability),
        pivots=torch.tensor([[-1, 0, 0, -1], [-1, -1, 1, -1], [3, -1, -1, -1]]),
        model_name="toy/toy-model",
        num_attention_heads=8,
        head_dim=16,
        revision="0123abcd",
        tau_stable=0.5,
        tau_sim=0.5,
        topk=64,
        calibration={"num_texts": 2, "prefill_tokens": 256},
        source={"made_by": "heterocache.profile.testing.toy_profile"},
    )
    fields.update(overrides)
    return HeadProfile(**fields)


def tiny_profile(num_layers: int, num_kv_heads: int, num_attention_heads: int, head_dim: int,
                 model_name: str = "tiny/model") -> HeadProfile:
    """A valid profile of any shape (for tiny random models of any family), cycling over layers::

        layer 3i:    P  S  A ...   (a pivot and its satellite; anchors)
        layer 3i+1:  V  A  A ...
        layer 3i+2:  A  A  A ...

    With one KV head per layer the pivot layers hold an anchor instead (a pivot needs a satellite).
    """
    roles = torch.full((num_layers, num_kv_heads), int(Role.ANCHOR))
    pivots = torch.full((num_layers, num_kv_heads), -1)
    for layer in range(num_layers):
        if layer % 3 == 0 and num_kv_heads >= 2:
            roles[layer, 0], roles[layer, 1], pivots[layer, 1] = int(Role.PIVOT), int(Role.SATELLITE), 0
        elif layer % 3 == 1:
            roles[layer, 0] = int(Role.VOLATILE)
    stability = 0.3 + 0.6 * torch.rand(num_layers, num_kv_heads, generator=torch.Generator().manual_seed(0))
    return HeadProfile(
        roles=roles, stability=stability, budget_ratios=budget_ratios(roles, stability), pivots=pivots,
        model_name=model_name, num_attention_heads=num_attention_heads, head_dim=head_dim, topk=64,
        source={"made_by": "heterocache.profile.testing.tiny_profile"},
    )


def tiny_llama(seed: int = 0, layers: int = 2, attn_implementation: str = "sdpa"):
    """Random-weight Llama: 2 layers, 4 query heads, 2 KV heads, head_dim 16, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return _build(LlamaForCausalLM, config, seed, attn_implementation, "tiny/llama")


def tiny_qwen3(seed: int = 0, layers: int = 2, attn_implementation: str = "sdpa"):
    """Random-weight Qwen3 (q_norm/k_norm): 2 layers, 4 query heads, 2 KV heads, head_dim 16, vocab 128."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return _build(Qwen3ForCausalLM, config, seed, attn_implementation, "tiny/qwen3")


def _build(cls, config, seed: int, attn_implementation: str, name: str):
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config).eval()
    model.config.name_or_path = name
    return model


def random_token_texts(count: int, length: int, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``count`` sequences of ``length`` random token ids (pre-tokenised calibration texts)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator) for _ in range(count)]
