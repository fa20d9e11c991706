"""The grader of final descriptions (docs/methods.md §10.9): an LLM scores a description 1–5 against a rubric and the
true description of the finetuning; the score is read from its ``SCORE: N`` line."""

from __future__ import annotations

import re
from typing import Any

from crosscoder.eval.adl.endpoint import ChatClient

RUBRIC = """5: names the finetuning's domain and its trained behaviour, with the specifics of the true description.
4: names the domain and the behaviour correctly, but misses or blurs specifics.
3: names the domain (or a close, broader one) but not the behaviour, or the behaviour in the wrong domain.
2: touches the domain only vaguely, or lists it among several unrelated candidates.
1: wrong, unrelated, inconclusive, or no description at all."""

SYSTEM = """You are a strict grader of descriptions of what a language model was finetuned for. You are given the \
TRUE DESCRIPTION of the finetuning, a RUBRIC that maps the scores 1 to 5 to criteria, and a DESCRIPTION written by \
an investigator who could not see the finetuning data. Judge the DESCRIPTION against the TRUE DESCRIPTION using \
the RUBRIC only. Reply with one sentence of reasoning, then a last line of the form SCORE: <1-5>."""

SCORE = re.compile(r"score\W{0,6}([1-5])\b", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    """The last ``SCORE: N`` (N in 1–5) of a reply, or the reply itself when it is just a digit 1–5; else None."""
    found = SCORE.findall(reply)
    if found:
        return int(found[-1])
    bare = reply.strip().strip("*.` ")
    return int(bare) if bare in {"1", "2", "3", "4", "5"} else None


class DescriptionGrader:
    """Scores descriptions with an LLM endpoint (temperature 0) against ``rubric``."""

    def __init__(self, client: ChatClient, rubric: str = RUBRIC) -> None:
        self.client, self.rubric = client, rubric

    def grade(self, description: str | None, truth: str) -> dict[str, Any]:
        """``{"score", "reply", "grader"}``; a run that ended without a description scores 1 without asking, a reply
        without a readable score gives ``score`` None."""
        grader = {"url": self.client.url, "model": self.client.model}
        if not description:
            return {"score": 1, "reply": None, "reason": "the run ended without a final description", "grader": grader}
        user = f"TRUE DESCRIPTION:\n{truth}\n\nRUBRIC:\n{self.rubric}\n\nDESCRIPTION:\n{description}"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        reply = self.client.complete(messages, temperature=0)
        score = parse_score(reply.content)
        result: dict[str, Any] = {"score": score, "reply": reply.content, "grader": grader}
        if score is None:
            result["reason"] = "the grader's reply holds no SCORE line"
        return result
