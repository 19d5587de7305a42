"""Fidelity without a benchmark: how far a compressed cache moves the next-token distribution.

For one text of ``P + N`` tokens: prefill the first ``P`` tokens into the method's cache, then feed
the next ``N`` tokens one at a time (teacher forcing: the true token, not the model's guess) and
collect the ``N`` next-token distributions. The same run with the full cache (a ``DynamicCache``)
is the reference. Reported per text: the mean over steps of KL(full || method) in nats and the
share of steps where both distributions have the same arg-max (top-1 agreement).

The default text is the generated essay of :mod:`heterocache.eval.haystack`; pass a file of real
prose for a more natural distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .._compat import cache_kwarg
from .generation import prefill
from .haystack import EssayStream


@dataclass(frozen=True)
class FidelityConfig:
    """Settings of the fidelity measurement.

    Attributes:
        prefill_tokens: ``P``, tokens prefilled (and compressed) before teacher forcing (1024).
        decode_tokens: ``N``, teacher-forced steps compared (128).
        num_samples: texts measured, each its own window of ``P + N`` tokens (2).
        text_path: a UTF-8 text file to cut the windows from; ``None`` uses the generated essay.
    """

    prefill_tokens: int = 1024
    decode_tokens: int = 128
    num_samples: int = 2
    text_path: Path | None = None

    def __post_init__(self) -> None:
        if self.prefill_tokens < 1 or self.decode_tokens < 1 or self.num_samples < 1:
            raise ValueError("prefill_tokens, decode_tokens and num_samples must be positive")


def fidelity_ids(tokenizer, config: FidelityConfig, index: int, seed: int) -> list[int]:
    """The ``P + N`` token ids of text number ``index``.

    From ``config.text_path``: the ``index``-th consecutive window of the file's tokens (BOS first
    if the tokenizer adds one). Otherwise: the essay stream of ``(seed, index)``, long enough.
    """
    total = config.prefill_tokens + config.decode_tokens
    if config.text_path is not None:
        text = Path(config.text_path).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        window = ids[index * total : (index + 1) * total]
        if len(window) < total:
            raise ValueError(
                f"{config.text_path} has {len(ids)} tokens: too short for {config.num_samples} "
                f"windows of {total} tokens"
            )
        return list(window)
    essay = EssayStream(f"{seed}:fidelity:{index}")
    n = max(total // 8, 16)
    while True:
        ids = tokenizer(essay.text(n), add_special_tokens=True)["input_ids"]
        if len(ids) >= total:
            return list(ids[:total])
        n *= 2


@torch.inference_mode()
def teacher_forced_logprobs(
    model, input_ids: list[int], cache, prefill_tokens: int, prefilled: bool = False,
    prefill_chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token log-probabilities, float32 ``[N, vocab]`` on the CPU, for the ``N`` teacher-forced
    steps after prefilling ``input_ids[:prefill_tokens]`` into ``cache``.

    Row ``t`` is the distribution after feeding token ``prefill_tokens + t`` (so it predicts token
    ``prefill_tokens + t + 1``; the last row predicts past the text, which is harmless).
    ``prefilled=True``: the cache already holds those tokens (a shared prefill filled it);
    ``prefill_chunk_size``: prefill them in pieces of this many tokens (default: one forward).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    if prefilled:
        if cache.get_seq_length() != prefill_tokens:
            raise ValueError(f"the cache holds {cache.get_seq_length()} tokens, not the {prefill_tokens} prefilled")
    else:
        prefill(model, ids[:, :prefill_tokens], cache, chunk_size=prefill_chunk_size)
    rows = []
    for t in range(prefill_tokens, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], **cache_kwarg(model, cache), use_cache=True)
        rows.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu())
    return torch.stack(rows)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || candidate) (nats) and top-1 agreement of two ``[N, vocab]`` log-prob tensors."""
    kl = (reference.exp() * (reference - candidate)).sum(-1).clamp_min(0.0)
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float()
    return {"kl": float(kl.mean()), "top1_agreement": float(agree.mean())}
