"""Graders: who picks the Patchscope scale and who judges whether steered text is coherent
(docs/methods.md §10.4).

A grader has ``name``, ``choose_scale(candidates) -> (index, reason)`` and
``coherent(prompt, texts, offline) -> list[bool]``. ``OfflineGrader`` (the default, no network) picks the scale
whose kept tokens agree most across the identity prompts and leaves coherence to the offline criterion the caller
passes in (``offline()``, the loss test of docs/methods.md §10.6). ``LLMGrader`` asks an OpenAI-compatible chat
endpoint instead; when the endpoint does not answer (or answers something unparseable) it says so once, notes it,
and falls back to the offline choice.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

Candidates = Sequence[dict[str, Any]]
"""Patchscope scales: dicts with ``scale``, ``tokens`` and ``agreement`` (docs/methods.md §10.3)."""


class Grader(Protocol):
    name: str

    def choose_scale(self, candidates: Candidates) -> tuple[int, str]: ...

    def coherent(self, prompt: str, texts: list[str], offline: Callable[[], list[bool]]) -> list[bool]: ...


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


SCALE_SYSTEM = (
    "You judge lists of tokens read out of a language model. Exactly one list is the most semantically coherent: "
    "its tokens share one topic or theme. Reply with that list's number only."
)
COHERENCE_SYSTEM = (
    "You judge whether texts written by a language model are coherent: fluent, grammatical and making sense, on any "
    "topic (a text that is on an unexpected topic is still coherent). For each numbered text reply with one line "
    "'<number>: COHERENT' or '<number>: INCOHERENT' and nothing else."
)


class LLMGrader:
    """An OpenAI-compatible chat-completions endpoint as grader (docs/methods.md §10.4).

    ``url`` is the API base (``…/v1``; ``/chat/completions`` is appended unless present). The key is read from the
    environment variable ``api_key_env`` at each request and sent as a bearer token; it is never stored, logged or
    written. ``notes`` records every fallback to the offline grader."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        fallback: OfflineGrader | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
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
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as error:
            self._note(f"grader {self.url} answered HTTP {error.code}: using the offline grader for this question")
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            self.unreachable = f"grader {self.url} did not answer ({reason}): using the offline grader instead"
            self._note(self.unreachable)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            self._note(f"grader {self.url} sent an unreadable reply ({type(error).__name__}): using the offline grader")
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
            labels = dict(
                (int(number), label.upper())
                for number, label in re.findall(r"(\d+)\s*[:.)\-]\s*(INCOHERENT|COHERENT)", reply, re.IGNORECASE)
            )
            if set(labels) == set(range(1, len(texts) + 1)):
                return [labels[number] == "COHERENT" for number in range(1, len(texts) + 1)]
            self._note(f"grader {self.url} did not label all {len(texts)} texts: using the offline criterion")
        return self.fallback.coherent(prompt, texts, offline)
