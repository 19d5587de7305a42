"""LongBench (Bai et al., 2023; THUDM/zai-org): loader, published prompts, generation lengths, metrics.

Files: the per-task JSON-lines files of the published ``data.zip``
(https://huggingface.co/datasets/THUDM/LongBench, also zai-org/LongBench), unzipped so that e.g.
``data/longbench/hotpotqa.jsonl`` exists (LongBench-E files are ``<task>_e.jsonl``: task name
``longbench/hotpotqa_e``). Each line has ``input, context, answers, length, dataset, language,
all_classes, _id``.

Published protocol reproduced here: the prompt template and ``max_new_tokens`` of each task; no
chat template for trec, triviaqa, samsum, lsht, lcc and repobench-p; over-long prompts truncated in
the middle (we cut the middle of the context so the question stays whole); for trec, triviaqa,
samsum and lsht only the first line of the reply is scored; a sample's score is the best over its
reference answers; the task score is the mean × 100. Metric differences are listed in
:mod:`heterocache.eval.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .. import metrics as M
from ..prompting import truncate_context_middle
from .base import Sample, Task
from .files import read_jsonl, require

SOURCE = (
    "Download data.zip from https://huggingface.co/datasets/THUDM/LongBench (zai-org/LongBench) "
    "and unzip its JSON-lines files into {dir}/"
)

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}  # fmt: skip

METRICS = {
    "narrativeqa": M.qa_f1, "qasper": M.qa_f1, "multifieldqa_en": M.qa_f1, "multifieldqa_zh": M.qa_f1_zh,
    "hotpotqa": M.qa_f1, "2wikimqa": M.qa_f1, "musique": M.qa_f1, "dureader": M.rouge_l,
    "gov_report": M.rouge_l, "qmsum": M.rouge_l, "multi_news": M.rouge_l, "vcsum": M.rouge_l,
    "trec": M.classification_score, "triviaqa": M.qa_f1, "samsum": M.rouge_l, "lsht": M.classification_score,
    "passage_count": M.count_score, "passage_retrieval_en": M.retrieval_score,
    "passage_retrieval_zh": partial(M.retrieval_score, zh=True),
    "lcc": M.code_sim_score, "repobench-p": M.code_sim_score,
}  # fmt: skip

#: Few-shot and completion tasks: published without the chat template, first reply line scored.
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def split_template(template: str, fields: dict) -> tuple[str, str]:
    """Fill ``template`` and split it right after the ``{context}`` placeholder."""
    head, tail = template.split("{context}", 1)
    return head.format(**fields) + fields["context"], tail.format(**fields)


def score_longbench(dataset: str, prediction: str, answers, all_classes) -> float:
    """LongBench sample score in [0, 1]: best metric value over the reference answers."""
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[dataset]
    best = 0.0
    for answer in answers:
        if metric is M.classification_score:
            value = metric(prediction, answer, all_classes or [])
        else:
            value = metric(prediction, answer)
        best = max(best, value)
    return best


@dataclass
class LongBenchTask(Task):
    """One LongBench task, read from ``<data_dir>/longbench/<dataset>.jsonl``.

    Args:
        dataset: task name as published (``hotpotqa``; ``hotpotqa_e`` for LongBench-E).
        data_dir: root holding ``longbench/`` (default ``data``).

    ``length`` is the prompt token limit: longer prompts are cut in the middle of the context.
    Samples are the first ``num_samples`` lines (0 = all); ``seed`` is not used.
    """

    dataset: str = "hotpotqa"
    data_dir: Path = Path("data")
    kind = "dataset"

    def __post_init__(self) -> None:
        base = self.dataset[:-2] if self.dataset.endswith("_e") else self.dataset
        if base not in PROMPTS:
            raise ValueError(f"unknown LongBench task {self.dataset!r}; known: {', '.join(PROMPTS)}")
        self.base = base
        self.name = f"longbench/{self.dataset}"

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "longbench" / f"{self.dataset}.jsonl"

    def load(self, limit: int | None = None) -> list[dict]:
        """The raw JSON objects of the task file (first ``limit``)."""
        path = require(self.path, "LongBench", SOURCE.format(dir=self.path.parent))
        return read_jsonl(path, limit)

    def to_sample(self, row: dict, index: int) -> Sample:
        context, question = split_template(PROMPTS[self.base], row)
        return Sample(
            task=self.name,
            index=index,
            context=context,
            question=question,
            answers=tuple(row["answers"]),
            max_new_tokens=MAX_NEW_TOKENS[self.base],
            chat=self.base not in NO_CHAT,
            meta={"_id": row.get("_id"), "length": row.get("length"), "all_classes": row.get("all_classes")},
        )

    def samples(self, formatter, length, num_samples, seed):
        rows = self.load(num_samples or None)
        return [truncate_context_middle(self.to_sample(r, i), formatter, length) for i, r in enumerate(rows)]

    def score(self, prediction, sample):
        return 100.0 * score_longbench(self.base, prediction, sample.answers, sample.meta.get("all_classes"))
