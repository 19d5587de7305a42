"""Answer scoring: RULER string match, LongBench/InfiniteBench metrics, LongBench v2 choice extraction.

Every function returns a fraction in [0, 1] for one prediction; tasks multiply by 100.

Where we differ from the published scripts (no extra dependency is allowed here):

- ROUGE-L: sentence-level LCS F1 (beta = 1) over lower-cased word tokens; CJK characters count as
  one token each. The published LongBench/InfiniteBench code calls the ``rouge`` package
  (summary-level union-LCS after splitting at ".") or HF ``evaluate`` (rougeLsum), and jieba for
  Chinese; numbers are close but not identical.
- Code edit similarity: ``difflib.SequenceMatcher(None, pred, ref).ratio()``, which is what
  ``fuzzywuzzy.fuzz.ratio`` computes (then rounds to an integer percent) when
  python-Levenshtein is absent. We do not round.
- Chinese QA F1: character tokens (InfiniteBench's choice) instead of jieba words (LongBench's).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Sequence

# ----------------------------------------------------------------------------------------------
# RULER


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` contained in ``prediction`` (case-insensitive), RULER's metric for
    needle, variable-tracking and common-word tasks. 1.0 for a single answer that is present."""
    if not answers:
        raise ValueError("no reference answers")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is contained in ``prediction`` (case-insensitive), RULER's QA metric."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


# ----------------------------------------------------------------------------------------------
# QA F1 (SQuAD normalisation, as LongBench and InfiniteBench publish it)


def normalize_answer(text: str) -> str:
    """Lower-case; drop ASCII punctuation, the articles a/an/the and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."  # noqa: E501  (verbatim)


def normalize_zh_answer(text: str) -> str:
    """Lower-case; drop ASCII and Chinese punctuation and all whitespace."""
    drop = set(string.punctuation + _ZH_PUNCTUATION)
    return "".join(ch for ch in text.lower() if ch not in drop and not ch.isspace())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1: overlap counted with multiplicity."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """English QA F1 after :func:`normalize_answer`, tokens split at whitespace."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """Chinese QA F1 over characters after :func:`normalize_zh_answer`."""
    return token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(reference)))


# ----------------------------------------------------------------------------------------------
# ROUGE-L

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ROUGE_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits); each CJK character is its own token."""
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: with L = LCS(pred, ref) over :func:`rouge_tokens`, P = L/|pred|, R = L/|ref|,
    F = 2PR/(P+R). 0.0 when either side has no tokens."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# LongBench task metrics


def edit_similarity(prediction: str, reference: str) -> float:
    """Character edit similarity ``2·M / (len(a)+len(b))`` from :class:`difflib.SequenceMatcher`
    (M = matched characters). 1.0 for equal strings (including two empty ones)."""
    return difflib.SequenceMatcher(None, prediction, reference).ratio()


def code_sim_score(prediction: str, reference: str) -> float:
    """LongBench code completion: edit similarity of the first generated line that is not a
    comment or a code fence (no "`", "#" or "//") against the reference line."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return edit_similarity(line, reference)


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench classification (trec, lsht): the class names found in the prediction, minus
    those that are strict substrings of the reference; 1/len(found) if the reference is among
    them, else 0. (The published code's fallback to the closest class by difflib is unreachable
    behind an always-true test, so it is not reproduced.)"""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


def count_score(prediction: str, reference: str) -> float:
    """LongBench passage_count: share of the integers in the prediction that equal the reference."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(reference) for n in numbers) / len(numbers)


def retrieval_score(prediction: str, reference: str, zh: bool = False) -> float:
    """LongBench passage_retrieval: share of the integers in the prediction that equal the
    paragraph number in the reference ("Paragraph 12" / "段落12")."""
    match = re.findall(r"段落(\d+)" if zh else r"Paragraph (\d+)", reference)
    if not match:
        raise ValueError(f"reference {reference!r} names no paragraph")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == match[0] for n in numbers) / len(numbers)


# ----------------------------------------------------------------------------------------------
# LongBench v2


def extract_choice(response: str) -> str | None:
    """The letter in "The correct answer is (X)" or "The correct answer is X" (asterisks
    ignored), LongBench v2's answer extraction; None when the reply commits to no letter."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(
        r"The correct answer is ([A-D])", response
    )
    return match.group(1) if match else None
