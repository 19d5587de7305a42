"""A KV-cache method of your own, in one file: key-norm eviction, compared with SnapKV on a needle prompt.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(https://arxiv.org/abs/2406.11430): keys with a low L2 norm draw high attention, so keep the
prompt tokens whose keys have the lowest norm. A ScorerPolicy is a method that is one scoring
function; register_method makes its cache class and its name, which make_cache, generate,
memory_report, `heterocache eval --methods-from THIS_FILE --methods keynorm` and
`heterocache bench --methods-from THIS_FILE --methods keynorm` all accept.

    python examples/custom_method.py [--tokens 2000] [--budget 0.3]    # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from heterocache import make_cache, register_method
from heterocache._compat import cache_kwarg
from heterocache.policy.scorer import ScorerPolicy


@register_method("keynorm", description="prompt tokens whose keys have the lowest L2 norm (Devoto et al. 2024)",
                 paper="https://arxiv.org/abs/2406.11430")
@dataclass
class KeyNormPolicy(ScorerPolicy):
    """Keep the tokens with the lowest key norm, and the last ``keep_last`` prompt tokens.

    Args:
        budget: fraction of the prompt KV kept, in (0, 1] (default 0.25).
        keep_last: newest prompt tokens always kept (the question), default 8.
    """

    keep_last: int = 8

    def score(self, ctx):  # ctx.key: [B, H, L, D] -> a score per KV head and token, [B, H, L]
        return -ctx.key.float().norm(dim=-1)

    def protected_tokens(self) -> int:
        return self.keep_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length (default 2000)")
    parser.add_argument("--budget", type=float, default=0.3, help="fraction of the prompt KV kept (default 0.3)")
    args = parser.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))

    from heterocache.eval.prompting import PromptFormatter
    from heterocache.eval.tasks.ruler import NeedleTask
    from heterocache.models import load_smollm2

    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    formatter = PromptFormatter(tokenizer)
    sample = NeedleTask().samples(formatter, args.tokens, num_samples=1, seed=0)[0]
    ids = torch.tensor([formatter.encode(sample).input_ids])
    print(f"{ids.shape[1]}-token prompt; expected answer: {sample.answers[0]}")
    for method in ("dynamic", "snapkv", "keynorm"):
        cache = make_cache(method, args.budget, model)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache),
                             max_new_tokens=16, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        kv = "" if method == "dynamic" else f", KV {cache.memory_report().device_bytes / 2**20:.1f} MiB"
        found = "found" if sample.answers[0].lower() in text.lower() else "missed"
        print(f"{method:8s} {found:6s}{kv}: {text!r}")


if __name__ == "__main__":
    main()
