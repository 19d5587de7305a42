"""From a :class:`~heterocache.eval.tasks.base.Sample` to token ids, with the context/question split.

The prompt is rendered once as a string (chat template and answer prefix included) and tokenized
in one piece, so both evaluation modes see the very same ids; ``context_len`` says how many
leading ids belong to the context (prefilled alone in query-agnostic mode). The split is found
from the tokenizer's offsets: a token that straddles the boundary goes to the question, so the
context part never contains question text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tasks import this module; keep the import one-way at run time
    from .tasks.base import Sample

# Stands where the question starts while the chat template renders; removed before tokenizing.
_SPLIT = "\u2063<<heterocache:question>>\u2063"


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt.

    Attributes:
        input_ids: the whole prompt, ``[T]`` ids.
        context_len: number of leading ids that form the context (``0 < context_len <= T``).
    """

    input_ids: list[int]
    context_len: int

    @property
    def length(self) -> int:
        return len(self.input_ids)


class PromptFormatter:
    """Renders and tokenizes samples for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers give exact split points; slow ones
            fall back to tokenizing the two parts separately).
        chat_template: ``None`` (default) applies the tokenizer's chat template when it has one;
            ``True`` requires one; ``False`` never applies it.
        system_prompt: optional system message put before the user turn when templating.
    """

    def __init__(self, tokenizer, chat_template: bool | None = None, system_prompt: str | None = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.use_chat = has_template if chat_template is None else bool(chat_template)
        self.system_prompt = system_prompt

    def render(self, sample: "Sample") -> tuple[str, int, bool]:
        """The prompt string, the character index where the question starts, and whether the
        tokenizer should add its special tokens (True when no chat template was applied)."""
        user = sample.context + _SPLIT + sample.question
        if self.use_chat and sample.chat:
            messages = [{"role": "user", "content": user}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            add_special = (
                False  # the template writes BOS itself, as apply_chat_template(tokenize=True) assumes
            )
        else:
            text, add_special = user, True
        text += sample.answer_prefix
        if text.count(_SPLIT) != 1:
            raise ValueError("the chat template altered or duplicated the user message; cannot split it")
        split_at = text.index(_SPLIT)
        return text.replace(_SPLIT, ""), split_at, add_special

    def encode(self, sample: "Sample") -> EncodedPrompt:
        """Token ids of ``sample`` and the number of context ids."""
        text, split_at, add_special = self.render(sample)
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            context_len = next(
                (i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > split_at), len(ids)
            )
        else:
            head = tok(text[:split_at], add_special_tokens=add_special)["input_ids"]
            tail = tok(text[split_at:], add_special_tokens=False)["input_ids"]
            ids, context_len = list(head) + list(tail), len(head)
        if context_len == 0:
            raise ValueError(f"sample {sample.task}[{sample.index}] has an empty context")
        return EncodedPrompt(ids, context_len)

    def count(self, sample: "Sample") -> int:
        """Number of prompt tokens of ``sample``."""
        return self.encode(sample).length


def truncate_context_middle(sample: "Sample", formatter: PromptFormatter, max_tokens: int) -> "Sample":
    """Shorten ``sample.context`` in its middle until the whole prompt fits ``max_tokens`` tokens.

    LongBench and InfiniteBench truncate over-long prompts in the middle ("the left and right side
    may contain crucial instructions"); cutting the context rather than the whole prompt keeps the
    question intact, which the query-agnostic split needs. Returns ``sample`` unchanged when it
    fits; the result's ``meta["truncated_tokens"]`` records how many context tokens were dropped.
    """
    total = formatter.count(sample)
    if total <= max_tokens:
        return sample
    tok = formatter.tokenizer
    ctx_ids = tok(sample.context, add_special_tokens=False)["input_ids"]
    overhead = total - len(ctx_ids)
    if overhead >= max_tokens:
        raise ValueError(
            f"{sample.task}[{sample.index}]: instructions and question alone take {overhead} tokens, "
            f"more than the {max_tokens}-token limit"
        )
    keep = max_tokens - overhead
    for _ in range(8):  # re-tokenizing the joined halves can add a token or two at the seam
        head, tail = keep // 2, keep - keep // 2
        context = tok.decode(ctx_ids[:head], skip_special_tokens=True) + tok.decode(
            ctx_ids[len(ctx_ids) - tail :], skip_special_tokens=True
        )
        meta = dict(sample.meta, truncated_tokens=len(ctx_ids) - keep)
        cut = replace(sample, context=context, meta=meta)
        excess = formatter.count(cut) - max_tokens
        if excess <= 0:
            return cut
        keep -= excess
    raise RuntimeError(f"could not truncate {sample.task}[{sample.index}] to {max_tokens} tokens")
