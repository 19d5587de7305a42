"""A prompt prefilled in pieces (``generate(prefill_chunk_size=N)``, several forward calls) gives
every method the cache of a one-piece prefill (``docs/prefill.md``): the same greedy tokens, the
same kept positions and the same bytes; the prompt ends at the first decode step or at
``end_prompt()``; ``prefill="bounded"`` keeps memory bounded by the budget."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import DynamicCache

from helpers import dynamic_reference, tiny_model
from heterocache import FullKVCache, SnapKVCache, list_methods, make_cache
from heterocache._compat import cache_kwarg
from heterocache.bench.diagnostics import count_steps
from heterocache.eval.generation import prefill
from heterocache.profile.testing import toy_profile

pytestmark = pytest.mark.usefixtures("one_thread")

# The toy profile's shape: 3 layers, 8 query heads, 4 KV heads, head_dim 16.
SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
L, PAD = 150, 40  # row 1 is left-padded by 40 tokens: its padding spans several pieces
#: Options that make every method compress (or offload) on a 150-token prompt.
OPTIONS = {
    "shadowkv": dict(outlier_chunks=2, local_chunks=1),
    "omnikv": dict(offload=True),
    "heterocache": dict(profile=toy_profile()),
}
METHODS = [m for m in list_methods() if m != "dynamic"]  # "dynamic" is transformers' own cache
#: One chunk shorter than SnapKV's observation window (32), one longer, one not dividing the prompt.
CHUNKS = (16, 48)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", **SHAPE)


def _batch(length=L, pad=PAD, seed=0):
    ids = torch.randint(1, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def _cache(method, model, budget=0.3, **extra):
    return make_cache(method, budget, model, **{**OPTIONS.get(method, {}), **extra})


def kept(cache) -> list[str]:
    """Per layer a digest of the positions every (row, KV head) keeps (as sets)."""
    out = []
    for layer in cache.layers:
        if layer.store is None:
            continue
        _, _, valid, pos = layer.store.padded()
        pos = pos.masked_fill(~valid, torch.iinfo(torch.int64).max).sort(-1).values
        out.append(hashlib.sha256(repr(tuple(pos.shape)).encode() + pos.numpy().tobytes()).hexdigest()[:12])
    return out


def snapshot(cache, tokens) -> dict:
    report = cache.memory_report()
    return {
        "tokens": tokens.tolist(),
        "device_bytes": report.device_bytes,
        "host_bytes": report.host_bytes,
        "stored": [t.tolist() for t in cache.stored_tokens()],
        "kept": kept(cache),
    }


def run(model, method, chunk, new_tokens=8, **extra) -> dict:
    ids, mask = _batch()
    cache = _cache(method, model, **extra)
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=new_tokens,
                         do_sample=False, prefill_chunk_size=chunk)
    return snapshot(cache, out[:, ids.shape[1]:])


@pytest.mark.parametrize("method", METHODS)
def test_a_chunked_prefill_keeps_what_one_piece_keeps(model, method):
    whole = run(model, method, None)
    for chunk in CHUNKS:
        assert run(model, method, chunk) == whole, (method, chunk)


def test_the_methods_do_compress_here(model):
    """The comparison above is not vacuous: every compressing method drops or offloads tokens."""
    full = run(model, "fullkv", None)
    for method in METHODS:
        if method in ("fullkv", "quest"):  # quest keeps every token (it saves bandwidth)
            continue
        got = run(model, method, None, new_tokens=1)
        assert got["stored"] != full["stored"] or got["host_bytes"] > 0, method


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_fullkv_chunked_gives_dynamic_cache_tokens(chunk):
    model, ids, kw, ref = dynamic_reference(SHAPE, L=90, pad=(1, 11))
    out = model.generate(ids, **cache_kwarg(model, FullKVCache()), prefill_chunk_size=chunk, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["snapkv", "h2o", "heterocache"])
def test_a_conversation_after_a_chunked_prefill(model, method):
    """A second turn (after decoding) is appended as a turn, whatever the chunk size of the prompt
    (and of the turn for methods that do nothing at turns; HeteroCache re-selects at each piece of
    a turn in pieces: docs/prefill.md)."""
    ids, mask = _batch()
    results = {}
    turn_chunk = None if method == "heterocache" else 16
    for chunk in (None, 16):
        cache = _cache(method, model)
        first = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=6,
                               do_sample=False, prefill_chunk_size=chunk)
        turn = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(5))
        conv = torch.cat([first, turn], 1)
        conv_mask = torch.cat([mask, torch.ones(2, conv.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        out = model.generate(conv, attention_mask=conv_mask, **cache_kwarg(model, cache), max_new_tokens=6,
                             do_sample=False, prefill_chunk_size=chunk and turn_chunk)
        results[chunk] = snapshot(cache, out[:, conv.shape[1]:])
    assert results[16] == results[None]


@pytest.mark.parametrize("method", ["snapkv", "h2o", "heterocache"])
@torch.inference_mode()  # as the harness runs (its prefill makes inference tensors)
def test_end_prompt_makes_the_question_a_new_turn(model, method):
    """The query-agnostic flow: the harness's context prefill (in pieces or not) ends the prompt,
    so the question is a turn; without ``end_prompt`` it is more prompt (query-aware)."""
    ids = torch.randint(1, 256, (1, 140), generator=torch.Generator().manual_seed(1))
    context = 110
    gen = dict(max_new_tokens=6, do_sample=False)
    results = {}
    for chunk in (None, 16):
        cache = _cache(method, model)
        prefill(model, ids[:, :context], cache, chunk_size=chunk)
        assert all(layer.prompt is None for layer in cache.layers)
        out = model.generate(ids, **cache_kwarg(model, cache), **gen)
        results[chunk] = snapshot(cache, out[:, ids.shape[1]:])
    assert results[16] == results[None]
    # Without end_prompt the question joins the prompt: the query-aware cache.
    aware = _cache(method, model)
    reference = model.generate(ids, **cache_kwarg(model, aware), **gen)
    merged = _cache(method, model)
    model(ids[:, :context], **cache_kwarg(model, merged))
    out = model.generate(ids, **cache_kwarg(model, merged), **gen)
    assert snapshot(merged, out[:, ids.shape[1]:]) == snapshot(aware, reference[:, ids.shape[1]:])


def test_memory_report_counts_an_open_prompt_uncompressed(model):
    ids, _ = _batch()
    cache = SnapKVCache(budget=0.25, block_size=16, reserve=0)
    model(ids[:, :100], **cache_kwarg(model, cache))
    open_report = cache.memory_report()
    assert {r for layer in open_report.layers for r in layer.roles} == {"open prompt"}
    assert cache.stored_tokens() == []
    assert open_report.device_bytes >= open_report.dynamic_bytes
    cache.end_prompt()
    assert cache.memory_report().device_bytes < open_report.device_bytes
    assert [t.tolist() for t in cache.stored_tokens()] == [[[25] * 4, [25] * 4]] * 3
    cache.end_prompt()  # nothing open: a no-op


def test_crop_ends_an_open_prompt_first(model):
    ids, _ = _batch()
    cropped, ended = SnapKVCache(budget=0.25), SnapKVCache(budget=0.25)
    for cache in (cropped, ended):
        model(ids[:, :100], **cache_kwarg(model, cache))
    ended.end_prompt()
    cropped.crop(-10)
    ended.crop(-10)
    assert kept(cropped) == kept(ended) and cropped.get_seq_length() == 90


def test_decode_steps_after_a_chunked_prefill_read_nothing_more_on_the_host(model):
    """The first decode step compresses (a prefill's reads); the steps after it read what the
    steps after a one-piece prefill read."""
    ids, _ = _batch()
    counts = {}
    for pieces in (1, 3):
        cache = SnapKVCache(budget=0.3)
        for part in ids.tensor_split(pieces, dim=1):
            logits = model(part, **cache_kwarg(model, cache)).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        _, counts[pieces] = count_steps(model, cache, token, steps=4, warmup=1)
    assert counts[3]["host_reads"] == counts[1]["host_reads"]
    assert counts[3]["reads_by_kind"] == counts[1]["reads_by_kind"]


# ---- bounded prefill ---------------------------------------------------------------------------------
BOUNDED = ["fullkv", "streamingllm", "snapkv", "pyramidkv", "quest", "heterocache"]


@pytest.mark.parametrize("method", BOUNDED)
def test_a_bounded_prefill_in_one_piece_is_the_exact_one(model, method):
    assert run(model, method, L, prefill="bounded") == run(model, method, None)


@pytest.mark.parametrize("method", BOUNDED)
def test_a_bounded_prefill_keeps_the_exact_bytes_and_never_more_than_budget_and_piece(model, method):
    exact = run(model, method, None)
    ids, mask = _batch()
    cache = _cache(method, model, prefill="bounded")
    chunk, most = 16, []
    for lo in range(0, L, chunk):
        model(ids[:, lo:lo + chunk], attention_mask=mask[:, :lo + chunk], **cache_kwarg(model, cache))
        most.append(max(int(layer.store.length_h.max()) for layer in cache.layers))
    final = run(model, method, chunk, prefill="bounded")
    assert (final["device_bytes"], final["host_bytes"], final["stored"]) == (
        exact["device_bytes"], exact["host_bytes"], exact["stored"])
    if method not in ("fullkv", "quest"):  # those keep the whole prompt
        longest_kept = max(max(max(row) for row in layer) for layer in exact["stored"])
        assert max(most) <= longest_kept + chunk


@pytest.mark.parametrize("method", ["h2o", "cake", "shadowkv", "omnikv"])
def test_methods_that_need_the_whole_prompt_refuse_a_bounded_prefill(model, method):
    with pytest.raises(ValueError, match="prefill='exact'"):
        _cache(method, model, prefill="bounded")


def test_the_prefill_mode_is_checked():
    with pytest.raises(ValueError, match="prefill must be one of"):
        SnapKVCache(budget=0.3).prefill = "lazy"


# ---- the real model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["snapkv", "h2o", "heterocache"])
def test_smollm2_chunked_prefill_keeps_what_one_piece_keeps(smollm2, method):
    model, tokenizer = smollm2
    text = "The secret code of the blue door is 4172. " + "The weather was mild and the sky was clear. " * 40
    ids = tokenizer(text + "What is the secret code of the blue door?", return_tensors="pt")["input_ids"]
    results = {}
    for chunk in (None, 64):
        cache = make_cache(method, 0.3, model)
        out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=8, do_sample=False,
                             prefill_chunk_size=chunk)
        results[chunk] = snapshot(cache, out[:, ids.shape[1]:])
    assert results[64] == results[None]
    assert results[None]["stored"] != [[[ids.shape[1]] * 3]] * 30  # compressed


def test_dynamic_cache_reference_for_the_conversation():
    """Sanity of the oracle: transformers' own cache gives the same tokens chunked or not."""
    model = tiny_model("llama", attn="sdpa", **SHAPE)
    ids, mask = _batch()
    outs = [model.generate(ids, attention_mask=mask, **cache_kwarg(model, DynamicCache()), max_new_tokens=6,
                           do_sample=False, prefill_chunk_size=chunk) for chunk in (None, 16)]
    assert torch.equal(*outs)
