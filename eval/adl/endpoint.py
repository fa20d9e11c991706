"""The one client of OpenAI-compatible chat-completions endpoints (vLLM, llama.cpp, Ollama, hosted APIs), shared by
the LLM grader (docs/methods.md §10.4) and the interpretability agent (docs/methods.md §10.9).

``POST {url}/chat/completions`` with the standard library only. The API key is read from the environment variable
``api_key_env`` at each request and sent as a bearer token; it is never stored on the client, logged or written.
Timeouts, connection failures, HTTP 408/429 and 5xx are retried with exponential backoff; any other HTTP error is
the server refusing the request and raises at once with the server's own message. Token use is summed in ``usage``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from crosscoder.errors import ConfigError, EndpointError, EndpointUnreachableError

RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class Usage:
    """What an endpoint has been paid so far: answered calls and tokens (as the server reports them; estimated as
    one token per 4 characters for a server that reports none, counted in ``estimated_calls``)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Reply:
    """One answer: the assistant's text and its token counts."""

    content: str
    prompt_tokens: int
    completion_tokens: int


def server_message(error: urllib.error.HTTPError) -> str:
    """The error text a server sent with an HTTP error (OpenAI's ``{"error": {"message"}}`` or the raw body)."""
    try:
        body = error.read().decode("utf-8", errors="replace")
    except OSError:
        return str(error.reason)
    try:
        detail = json.loads(body).get("error", body)
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)[:500]
    except (ValueError, AttributeError):
        return body.strip()[:500] or str(error.reason)


class ChatClient:
    """An OpenAI-compatible chat endpoint. ``url`` is the API base (``…/v1``; ``/chat/completions`` is appended
    unless present). ``require_key``: refuse to start (``ConfigError``) when ``api_key_env`` is unset; otherwise a
    missing key just sends no ``Authorization`` header (local servers need none)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        require_key: bool = False,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if not model:
            raise ConfigError("name the model the endpoint serves (--model)")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigError(
                f"timeout must be positive and retries, backoff ≥ 0 (got {timeout}, {retries}, {backoff})"
            )
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint {url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if api_key_env and os.environ.get(api_key_env) and self.url.startswith("http://") and not _is_local(host):
            raise ConfigError(
                f"refusing to send the API key in {api_key_env} in clear text to {self.url}: use https:// for a remote "
                "endpoint (plain http is fine for a server on this machine)"
            )
        if require_key and not (api_key_env and os.environ.get(api_key_env)):
            raise ConfigError(
                f"the environment variable {api_key_env} that should hold the API key for {self.url} is not set: "
                "export it, name another variable (--key-env), or pass --no-key for a local server that needs none"
            )
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.usage = Usage()

    def describe(self) -> dict[str, Any]:
        """URL, model and the key's variable name (never the key), with the usage so far."""
        return {"url": self.url, "model": self.model, "api_key_env": self.api_key_env, "usage": self.usage.as_dict()}

    def _request(self, messages: list[dict[str, str]], temperature: float | None, max_tokens: int | None):
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _spent(self) -> str:
        if self.usage.calls == 0:
            return "nothing was spent: no request to it has been answered"
        return f"{self.usage.calls} calls were answered before"

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Reply:
        """The assistant's reply to ``messages`` (``[{"role", "content"}, …]``); raises ``EndpointUnreachableError``
        when every try failed to get an answer, ``EndpointError`` when the server refused or sent no readable
        reply."""
        temperature = self.temperature if temperature is None else temperature
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        failure, status = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = self._request(messages, temperature, max_tokens)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                message = server_message(error)
                if error.code not in RETRIED_STATUSES:
                    raise EndpointError(
                        f"{self.url} refused the request for model {self.model!r} (HTTP {error.code}): {message}",
                        status=error.code,
                    ) from None
                failure, status = f"HTTP {error.code}: {message}", error.code
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                failure, status = str(getattr(error, "reason", error)) or type(error).__name__, None
            else:
                return self._read(raw)
        tries = f"{self.retries + 1} tr{'y' if self.retries == 0 else 'ies'}"
        if status is not None:
            raise EndpointError(f"{self.url} failed ({failure}) on {tries}; {self._spent()}", status=status)
        raise EndpointUnreachableError(
            f"the endpoint {self.url} did not answer ({failure}) after {tries}; {self._spent()}"
        )

    def _read(self, raw: bytes) -> Reply:
        try:
            payload = json.loads(raw.decode("utf-8"))
            content = payload["choices"][0]["message"]["content"]
            content = "" if content is None else str(content)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise EndpointError(
                f"{self.url} sent an unreadable reply ({type(error).__name__}: {raw[:200]!r})", status=200
            ) from None
        usage = payload.get("usage") or {}
        completion = usage.get("completion_tokens")
        if completion is None:
            self.usage.estimated_calls += 1
            completion = len(content) // 4 + 1
        prompt = int(usage.get("prompt_tokens") or 0)
        self.usage.calls += 1
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += int(completion)
        return Reply(content, prompt, int(completion))


def _is_local(host: str) -> bool:
    """Whether ``host`` names this machine (plain http to it does not leave the machine)."""
    return host in ("localhost", "::1") or host.startswith("127.")
