"""Graders: who picks the Patchscope scale and who judges whether steered text is coherent
(docs/methods.md §10.4).

A grader has ``name``, ``choose_scale(candidates) -> (index, reason)``,
``coherent(prompt, texts, offline) -> list[bool]`` and ``relevant(tokens, description, frequent, offline) ->
(labels, source)``. ``OfflineGrader`` (the default, no network) picks the scale whose kept tokens agree most across
the identity prompts and leaves coherence and relevance to the offline criteria the caller passes in (``offline()``:
the loss test of docs/methods.md §10.6, membership in the frequent tokens of §10.5). ``LLMGrader`` asks an
OpenAI-compatible chat endpoint instead; when the endpoint does not answer (or answers something unparseable) it
says so once, notes it, and falls back to the offline answer.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from crosscoder.errors import EndpointError, EndpointUnreachableError
from crosscoder.eval.adl.endpoint import ChatClient

Candidates = Sequence[dict[str, Any]]
"""Patchscope scales: dicts with ``scale``, ``tokens`` and ``agreement`` (docs/methods.md §10.3)."""


class Grader(Protocol):
    name: str

    def choose_scale(self, candidates: Candidates) -> tuple[int, str]: ...

    def coherent(self, prompt: str, texts: list[str], offline: Callable[[], list[bool]]) -> list[bool]: ...

    def relevant(
        self, tokens: Sequence[str], description: str, frequent: Sequence[str], offline: Callable[[], list[bool]]
    ) -> tuple[list[bool], str]: ...


class OfflineGrader:
    """Scale: the largest agreement across the prompts, ties to the smaller scale. Coherence: ``offline()``."""

    name = "offline"

    def choose_scale(self, candidates: Candidates) -> tuple[int, str]:
        if not candidates:
            raise ValueError("no Patchscope scales to choose from")
        index = min(range(len(candidates)), key=lambda i: (-candidates[i]["agreement"], candidates[i]["scale"]))
        return index, f"largest agreement across the prompts ({candidates[index]['agreement']:.3f})"

    def coherent(self, prompt: str, texts: list[str], offline: Callable[[], list[bool]]) -> list[bool]:
        return offline()

    def relevant(
        self, tokens: Sequence[str], description: str, frequent: Sequence[str], offline: Callable[[], list[bool]]
    ) -> tuple[list[bool], str]:
        return offline(), self.name


SCALE_SYSTEM = (
    "You judge lists of tokens read out of a language model. Exactly one list is the most semantically coherent: "
    "its tokens share one topic or theme. Reply with that list's number only."
)
COHERENCE_SYSTEM = (
    "You judge whether texts written by a language model are coherent: fluent, grammatical and making sense, on any "
    "topic (a text that is on an unexpected topic is still coherent). For each numbered text reply with one line "
    "'<number>: COHERENT' or '<number>: INCOHERENT' and nothing else."
)
RELEVANCE_SYSTEM = (
    "You judge whether tokens read out of a finetuned language model are relevant to what it was finetuned on. You "
    "are given a description of the finetune, the finetuning data's frequent tokens and numbered candidate tokens. A "
    "candidate is RELEVANT when it is clearly semantically related to the finetuning domain (a piece of a domain word "
    "counts; it need not be among the frequent tokens); generic tokens (whitespace, punctuation, stopwords, common "
    "affixes) are IRRELEVANT even when frequent. For each candidate reply with one line '<number>: RELEVANT' or "
    "'<number>: IRRELEVANT' and nothing else."
)
PERMUTATIONS = 3
"""Cyclic permutations of the candidate list the LLM labels; a token is relevant when all of them say so."""


def rotations(n: int, count: int = PERMUTATIONS) -> list[list[int]]:
    """The first ``count`` cyclic shifts of ``range(n)``: ``[0, 1, …], [1, 2, …, 0], …``."""
    return [[(shift + index) % n for index in range(n)] for shift in range(count)]


def numbered_labels(reply: str, n: int, yes: str, no: str) -> list[bool] | None:
    """``N: YES`` / ``N: NO`` lines of a reply as one flag per number 1…n (True for ``yes``); None unless every
    number is labelled."""
    pattern = rf"(\d+)\s*[:.)\-]\s*({no}|{yes})\b"
    labels = {int(number): label.upper() == yes for number, label in re.findall(pattern, reply, re.IGNORECASE)}
    if set(labels) != set(range(1, n + 1)):
        return None
    return [labels[number] for number in range(1, n + 1)]


class LLMGrader:
    """An OpenAI-compatible chat-completions endpoint as grader (docs/methods.md §10.4).

    ``url`` is the API base (``…/v1``; ``/chat/completions`` is appended unless present). The request goes through
    the shared ``ChatClient`` (one try, no retries): the key is read from the environment variable ``api_key_env``
    at each request and sent as a bearer token; it is never stored, logged or written. ``notes`` records every
    fallback to the offline grader."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        fallback: OfflineGrader | None = None,
    ) -> None:
        self.client = ChatClient(url, model, api_key_env=api_key_env, timeout=timeout, retries=0, temperature=0)
        self.url, self.model, self.api_key_env, self.timeout = self.client.url, model, api_key_env, timeout
        self.fallback = fallback or OfflineGrader()
        self.unreachable: str | None = None
        self.notes: list[str] = []

    @property
    def name(self) -> str:
        return f"llm:{self.model}"

    def describe(self) -> dict[str, Any]:
        """Name, endpoint and fallbacks, for the report (never the key)."""
        return {"name": self.name, "url": self.url, "unreachable": self.unreachable, "notes": list(self.notes)}

    def _note(self, message: str) -> None:
        self.notes.append(message)
        warnings.warn(message, stacklevel=3)

    def ask(self, system: str, user: str) -> str | None:
        """The endpoint's reply, or None (noted) when it does not answer; after one failure to connect it is not
        asked again."""
        if self.unreachable is not None:
            return None
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return self.client.complete(messages).content
        except EndpointUnreachableError as error:
            self.unreachable = f"grader: {error}; using the offline grader instead"
            self._note(self.unreachable)
        except EndpointError as error:
            self._note(f"grader: {error}; using the offline grader for this question")
        return None

    def choose_scale(self, candidates: Candidates) -> tuple[int, str]:
        lists = "\n".join(
            f"{number}. {', '.join(repr(token) for token in candidate['tokens'])}"
            for number, candidate in enumerate(candidates, start=1)
        )
        reply = self.ask(SCALE_SYSTEM, f"Token lists:\n{lists}\n\nWhich list is the most semantically coherent?")
        if reply is not None:
            match = re.search(r"\d+", reply)
            if match and 1 <= int(match.group()) <= len(candidates):
                return int(match.group()) - 1, f"{self.name} chose list {match.group()}"
            self._note(f"grader {self.url} gave no list number in {reply[:80]!r}: using the offline choice")
        index, reason = self.fallback.choose_scale(candidates)
        return index, f"offline fallback: {reason}"

    def coherent(self, prompt: str, texts: list[str], offline: Callable[[], list[bool]]) -> list[bool]:
        numbered = "\n\n".join(f"Text {number}:\n{text}" for number, text in enumerate(texts, start=1))
        reply = self.ask(COHERENCE_SYSTEM, f"Each text answers the prompt {prompt!r}.\n\n{numbered}")
        if reply is not None:
            labels = numbered_labels(reply, len(texts), "COHERENT", "INCOHERENT")
            if labels is not None:
                return labels
            self._note(f"grader {self.url} did not label all {len(texts)} texts: using the offline criterion")
        return self.fallback.coherent(prompt, texts, offline)

    def relevant(
        self, tokens: Sequence[str], description: str, frequent: Sequence[str], offline: Callable[[], list[bool]]
    ) -> tuple[list[bool], str]:
        """RELEVANT / IRRELEVANT per token given the finetune's ``description`` and its data's ``frequent`` tokens
        (docs/methods.md §10.5): asked for ``PERMUTATIONS`` cyclic shifts of the list, a token is relevant when every
        answer says so. Any unanswered or incompletely labelled shift: ``offline()`` for the whole list, noted."""
        if not tokens:
            return [], self.name
        runs = []
        for order in rotations(len(tokens)):
            candidates = "\n".join(f"{number}. {tokens[index]!r}" for number, index in enumerate(order, start=1))
            reply = self.ask(
                RELEVANCE_SYSTEM,
                f"Description of the finetune:\n{description}\n\nFrequent tokens of the finetuning data:\n"
                f"{', '.join(repr(token) for token in frequent)}\n\nCandidate tokens:\n{candidates}",
            )
            labels = None if reply is None else numbered_labels(reply, len(tokens), "RELEVANT", "IRRELEVANT")
            if labels is None:
                if reply is not None:
                    self._note(f"grader {self.url} did not label all {len(tokens)} tokens: using offline relevance")
                return self.fallback.relevant(tokens, description, frequent, offline)[0], "offline fallback"
            runs.append(dict(zip(order, labels, strict=True)))
        return [all(run[index] for run in runs) for index in range(len(tokens))], self.name
