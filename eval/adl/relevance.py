"""Token relevance: how many of the lens's top tokens belong to the finetuning data (docs/methods.md §10.5).

The finetuning data's *frequent tokens* are its tokens counted at least ``min_count`` times that are not generic:
not special tokens, not of length ≤ 1 after stripping, not made only of punctuation and whitespace, and not in the
shipped stopword list. A list of top tokens scores the share of them that are frequent tokens, and the same share
weighted by the tokens' probabilities. With an LLM grader and a description of the finetune, the grader's labels
give the same two scores (``llm_relevance``).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from crosscoder.errors import DataError
from crosscoder.eval.adl.graders import Grader

MIN_COUNT = 10
"""A token of the finetuning data is frequent from this many occurrences."""


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    """The shipped stopword list (``stopwords.txt``)."""
    text = resources.files("crosscoder.eval.adl").joinpath("stopwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


_PUNCTUATION = set(string.punctuation)


def is_generic(token: str) -> bool:
    """Generic: length ≤ 1 after strip, only punctuation and whitespace, or a stopword."""
    stripped = token.strip()
    if len(stripped) <= 1:
        return True
    if all(char in _PUNCTUATION or char.isspace() for char in stripped):
        return True
    return stripped.lower() in stopwords()


def document_text(row: Any) -> str:
    """A data row as plain text: a string, a ``{"text": …}`` row, or the message contents of a ``{"messages": …}``
    row (or a bare message list) joined by newlines."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("messages") if isinstance(row, dict) else row
    if isinstance(messages, list) and all(isinstance(m, dict) and "content" in m for m in messages):
        return "\n".join(str(message["content"]) for message in messages)
    raise DataError("a finetuning-data row needs a 'text' string or a 'messages' list of {role, content}")


def token_counts(tokenizer: Any, rows: Iterable[Any]) -> Counter:
    """Occurrences of every token id in the rows' text (no special tokens added)."""
    counts: Counter = Counter()
    for row in rows:
        counts.update(tokenizer(document_text(row), add_special_tokens=False, verbose=False)["input_ids"])
    return counts


def frequent_tokens(tokenizer: Any, rows: Iterable[Any], min_count: int = MIN_COUNT) -> dict[int, int]:
    """The finetuning data's frequent, non-generic token ids with their counts (docs/methods.md §10.5)."""
    counts = token_counts(tokenizer, rows)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return {
        token: count
        for token, count in counts.most_common()
        if count >= min_count and token not in special and not is_generic(tokenizer.decode([token]))
    }


def relevance(
    entry: dict[str, Any],
    frequent: dict[int, int] | set[int],
    k: int | None = None,
    labels: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Share of the (first ``k``) tokens of a lens entry (``token_ids``, ``probs``) that are relevant, and the
    probability-weighted share; the relevant tokens themselves. Relevant: among the ``frequent`` tokens ("trivial"
    relevance), or as ``labels`` say (one flag per token, e.g. an LLM grader's)."""
    ids = list(entry["token_ids"])[:k]
    probs = list(entry["probs"])[:k]
    tokens = list(entry.get("tokens", ids))[:k]
    hits = [token_id in frequent for token_id in ids] if labels is None else list(labels)
    total = sum(probs)
    return {
        "share": sum(hits) / len(ids) if ids else 0.0,
        "weighted": sum(p for p, hit in zip(probs, hits, strict=True) if hit) / total if total > 0 else 0.0,
        "relevant": [token for token, hit in zip(tokens, hits, strict=True) if hit],
        "n_tokens": len(ids),
    }


def llm_relevance(
    entry: dict[str, Any],
    frequent: dict[int, int],
    k: int | None,
    grader: Grader,
    description: str,
    frequent_text: Sequence[str],
) -> dict[str, Any]:
    """``relevance`` with the grader's RELEVANT / IRRELEVANT labels (docs/methods.md §10.5): the top ``k`` tokens
    are labelled given the finetune's ``description`` and its data's frequent tokens ``frequent_text``; where the
    grader falls back, the trivial labels. Adds ``labelled_by`` (the grader's name or ``"offline fallback"``)."""
    ids, tokens = list(entry["token_ids"])[:k], list(entry["tokens"])[:k]
    labels, source = grader.relevant(tokens, description, frequent_text, lambda: [i in frequent for i in ids])
    return {**relevance(entry, frequent, k, labels), "labelled_by": source}
