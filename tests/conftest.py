"""Shared fixtures: a toy profile with a config in its shape, one torch thread, the evaluation
harness's tokenizer, every architecture, and the real SmolLM2 loaded once. Plain helpers (tiny
random models, ...) are in ``helpers.py``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import heterocache  # noqa: F401  (registers the attention)
from helpers import ARCHS


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    """A folder holding a config in the toy profile's shape (3 layers, 8 query / 4 KV heads,
    head_dim 16; for ``random:`` models) and that profile as ``toy.safetensors``."""
    from heterocache.profile.testing import toy_profile

    folder = tmp_path_factory.mktemp("toy")
    LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=4, head_dim=16, vocab_size=256,
                max_position_embeddings=4096).save_pretrained(folder)
    toy_profile().save(folder / "toy.safetensors")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-matrix tests: faster, and much faster on a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    """The evaluation harness's offline byte-level tokenizer (``heterocache.eval.toy``)."""
    from heterocache.eval.toy import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct with heterocache attention, loaded once."""
    pytest.importorskip("gguf")
    from heterocache.models import load_smollm2

    try:
        return load_smollm2(attn_implementation="heterocache")
    except FileNotFoundError as err:  # pragma: no cover - CI installs it
        pytest.skip(str(err))
