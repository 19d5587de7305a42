"""Tiny stand-ins for a real model and tokenizer, built offline in milliseconds.

Used by the evaluation tests and handy for smoke-testing a cache method: a byte-level tokenizer
(one token per UTF-8 byte, lossless, with a ChatML-like chat template) and a randomly initialised
Llama small enough to run long prompts on a CPU.
"""

from __future__ import annotations

#: A ChatML-style template, so tests exercise the chat-template path like SmolLM2's.
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(chat_template: bool = True):
    """A byte-level tokenizer that needs no download.

    Ids 0..255 are the bytes; then ``<s>`` (256, prepended by ``add_special_tokens``), ``</s>``
    (257, also the pad token), ``<|im_start|>`` (258) and ``<|im_end|>`` (259). ``vocab_size``
    is 260. Offsets mappings work (it is a fast tokenizer).

    Args:
        chat_template: attach :data:`TOY_CHAT_TEMPLATE` (default True); False gives a tokenizer
            without a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the byte symbols by the byte they stand for, so that id == byte value.
    byte_to_symbol = _bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    for i, tok in enumerate(specials):
        vocab[tok] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    if chat_template:
        tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int = 260, seed: int = 0, dtype=None, max_position_embeddings: int = 4096):
    """A random-weight Llama (2 layers, hidden 64, 4 query / 2 KV heads, head_dim 16) in eval mode.

    Args:
        vocab_size: embedding rows (default 260, matching :func:`byte_tokenizer`).
        seed: torch seed for the weights.
        dtype: parameter dtype (default float32; float64 makes greedy decoding immune to
            summation-order noise, useful when comparing two code paths token for token).
        max_position_embeddings: the model's context length.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = 257
    return model.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what the ByteLevel pre-tokenizer uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
