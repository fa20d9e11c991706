"""The agent's three budgets (docs/methods.md §10.9): model interactions (prompts answered by the two models and
steered samples), calls to the agent's LLM, and the tokens that LLM generates. ``Budget`` holds the limits and what
has been used; every tool result shows ``remaining()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crosscoder.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """What one run may spend."""

    interactions: int = 10
    """Model interactions: one per prompt sent to the base and finetuned models, one per steered sample."""
    llm_calls: int = 50
    """Calls to the agent's LLM (the last one is kept for the final description)."""
    tokens: int = 100_000
    """Tokens the agent's LLM may generate (completion tokens, as the endpoint reports them)."""

    def check(self, blackbox: bool) -> Limits:
        """These limits, or ``ConfigError`` for a budget a run cannot work with."""
        if self.llm_calls < 1 or self.tokens < 1:
            raise ConfigError(
                f"the agent needs at least one LLM call and one generated token (got --llm-calls {self.llm_calls}, "
                f"--tokens {self.tokens}): nothing was run"
            )
        if self.interactions < 0:
            raise ConfigError(f"--interactions must be ≥ 0, got {self.interactions}")
        if blackbox and self.interactions == 0:
            raise ConfigError(
                "the blackbox agent can only learn by asking the models: give it at least one model interaction "
                "(--interactions N ≥ 1)"
            )
        return self


@dataclass
class Used:
    """What a run has spent so far."""

    interactions: int = 0
    llm_calls: int = 0
    tokens: int = 0


@dataclass
class Budget:
    """Limits and use of one run."""

    limits: Limits
    used: Used

    def remaining(self) -> dict[str, int]:
        """What is left of each budget (never negative)."""
        return {
            "model_interactions": max(0, self.limits.interactions - self.used.interactions),
            "llm_calls": max(0, self.limits.llm_calls - self.used.llm_calls),
            "tokens": max(0, self.limits.tokens - self.used.tokens),
        }

    def last_call(self) -> bool:
        """Whether the next LLM call is the last one allowed: one call left, or the token budget spent."""
        left = self.remaining()
        return left["llm_calls"] <= 1 or left["tokens"] == 0

    def charge_call(self, completion_tokens: int) -> None:
        self.used.llm_calls += 1
        self.used.tokens += completion_tokens

    def afford(self, interactions: int) -> bool:
        return interactions <= self.remaining()["model_interactions"]

    def charge_interactions(self, interactions: int) -> None:
        self.used.interactions += interactions

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"limits": asdict(self.limits), "used": asdict(self.used), "remaining": self.remaining()}
