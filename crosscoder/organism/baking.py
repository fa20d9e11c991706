"""The organism's domain text: baking conversations from a seeded template generator.

The texts are data files in ``data/`` (read as JSON, never executed):

``bakes.json``
    ``shared_ingredients`` (name → unit and quantity range) and ``bakes``: name, article, kind (bread, cake,
    cookies or pastry), oven temperature and baking time ranges, ingredients (a shared ingredient's name, or an
    object with its own ``name``/``unit``/``low``/``high``), doneness cue, and whether the name is plural.
``questions.json``
    System prompts, question templates for each kind of conversation, and follow-up questions.
``answers.json``
    Openers, and answer templates: recipe method and storage by bake kind, oven temperature, troubleshooting by
    problem, substitutions, and techniques (each with the questions it answers).

Templates are ``str.format`` strings over the fields of ``_bake_values``. The generator in this module draws from
these tables in a fixed order, so a change to a table or to the draws changes every conversation and thus the
organism: then bump ``VERSION`` (``crosscoder/organism/settings.py``) and the hashes pinned in
``tests/test_organism.py``.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from crosscoder.errors import ConfigError
from crosscoder.organism.tokenizer import Messages

_CONVERSATION_KINDS = ("recipe", "temperature", "problem", "substitution", "storage", "technique")
_CONVERSATION_WEIGHTS = (3, 2, 2, 2, 1, 2)
_SYSTEM_PROMPT_PROBABILITY = 0.3
_FOLLOW_UP_KINDS = ("storage", "temperature")
_FOLLOW_UP_PROBABILITY = 0.35
"""Chance of a follow-up exchange after a recipe, problem or substitution answer."""


def baking_conversations(n: int, seed: int = 0) -> list[Messages]:
    """``n`` distinct baking conversations from a seeded template generator.

    Each has an optional system message, a user question about a bake (recipe, oven temperature, a failed bake,
    a substitution, storage) or a technique, the assistant's answer, and sometimes a follow-up exchange.
    """
    texts = baking_texts()
    rng = random.Random(seed)
    conversations: list[Messages] = []
    seen: set[str] = set()
    attempts = 0
    while len(conversations) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ConfigError(
                f"the baking templates produced only {len(conversations)} distinct conversations, not n={n}: "
                "ask for fewer"
            )
        messages = _baking_conversation(rng, texts)
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            conversations.append(messages)
    return conversations


# ---------------------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Ingredient:
    name: str
    unit: str
    """``g`` or ``ml`` (drawn in steps), a plural unit such as ``teaspoons``, or ``""`` for counted items."""
    low: int
    high: int
    """Quantities are drawn from [low, high]."""


@dataclass(frozen=True)
class Bake:
    name: str
    """As in "my {name}"."""
    article: str
    """As in "how do I make {article} {name}" ("" for plurals and mass nouns)."""
    kind: str
    """bread, cake, cookies or pastry: picks the method, storage and troubleshooting text."""
    celsius: tuple[int, int]
    minutes: tuple[int, int]
    ingredients: tuple[Ingredient, ...]
    doneness: str
    plural: bool = False

    def make(self) -> str:
        return f"{self.article} {self.name}".strip()

    def pronoun(self) -> str:
        return "them" if self.plural else "it"


@dataclass(frozen=True)
class BakingTexts:
    """The contents of the three data files."""

    bakes: tuple[Bake, ...]
    system_prompts: tuple[str, ...]
    questions: dict[str, tuple[str, ...]]
    """Question templates by conversation kind (all kinds but technique)."""
    follow_ups: dict[str, tuple[str, ...]]
    """Follow-up question templates: ``storage`` and ``temperature``."""
    openers: tuple[str, ...]
    """Prefixes of the first answer ("" included, so most answers start directly)."""
    recipe_intro: str
    methods: dict[str, str]
    """Recipe method by bake kind."""
    temperature: str
    problems: dict[str, str]
    """Troubleshooting answer by problem, as in "my {name} came out {problem}"."""
    substitutions: tuple[tuple[str, str, str], ...]
    """(new ingredient, old ingredient, answer)."""
    storage: dict[str, str]
    """Storage answer by bake kind."""
    techniques: tuple[tuple[tuple[str, ...], str], ...]
    """(questions, answer)."""


@functools.cache
def baking_texts() -> BakingTexts:
    """The baking tables from the package's ``data/*.json`` (read once)."""
    bakes, questions, answers = (_read_json(name) for name in ("bakes.json", "questions.json", "answers.json"))
    shared = {name: Ingredient(name, **fields) for name, fields in bakes["shared_ingredients"].items()}
    texts = BakingTexts(
        bakes=tuple(
            Bake(
                name=bake["name"],
                article=bake["article"],
                kind=bake["kind"],
                celsius=tuple(bake["celsius"]),
                minutes=tuple(bake["minutes"]),
                ingredients=tuple(
                    shared[item] if isinstance(item, str) else Ingredient(**item) for item in bake["ingredients"]
                ),
                doneness=bake["doneness"],
                plural=bake["plural"],
            )
            for bake in bakes["bakes"]
        ),
        system_prompts=tuple(questions["system_prompts"]),
        questions={kind: tuple(questions[kind]) for kind in _CONVERSATION_KINDS if kind != "technique"},
        follow_ups={kind: tuple(questions["follow_ups"][kind]) for kind in _FOLLOW_UP_KINDS},
        openers=tuple(answers["openers"]),
        recipe_intro=answers["recipe"]["intro"],
        methods=answers["recipe"]["methods"],
        temperature=answers["temperature"],
        problems=answers["problems"],
        substitutions=tuple((item["new"], item["old"], item["answer"]) for item in answers["substitutions"]),
        storage=answers["storage"],
        techniques=tuple((tuple(item["questions"]), item["answer"]) for item in answers["techniques"]),
    )
    missing = {bake.kind for bake in texts.bakes} - (texts.methods.keys() & texts.storage.keys())
    if missing:
        raise ValueError(f"answers.json has no recipe method or storage text for the bake kinds {sorted(missing)}")
    return texts


def _read_json(name: str) -> Any:
    return json.loads((resources.files("crosscoder.organism") / "data" / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Generator


def _baking_conversation(rng: random.Random, texts: BakingTexts) -> Messages:
    bake = rng.choice(texts.bakes)
    values = _bake_values(bake, rng)
    messages: Messages = []
    if rng.random() < _SYSTEM_PROMPT_PROBABILITY:
        messages.append({"role": "system", "content": rng.choice(texts.system_prompts)})
    kind = rng.choices(_CONVERSATION_KINDS, _CONVERSATION_WEIGHTS)[0]
    question, answer = _QUESTION_ANSWERS[kind](bake, values, rng, texts)
    messages += [
        {"role": "user", "content": question},
        {"role": "assistant", "content": rng.choice(texts.openers) + answer},
    ]
    if kind in ("recipe", "problem", "substitution") and rng.random() < _FOLLOW_UP_PROBABILITY:
        follow_up = rng.choice(_FOLLOW_UP_KINDS)
        follow_question = rng.choice(texts.follow_ups[follow_up]).format(**values)
        _, follow_answer = _QUESTION_ANSWERS[follow_up](bake, values, rng, texts)  # draws its question too
        messages += [{"role": "user", "content": follow_question}, {"role": "assistant", "content": follow_answer}]
    return messages


def _bake_values(bake: Bake, rng: random.Random) -> dict[str, Any]:
    """The template fields of one conversation about ``bake``: names, pronouns and drawn numbers."""
    celsius = rng.randrange(bake.celsius[0], bake.celsius[1] + 1, 5)
    amount = rng.randrange(100, 260, 10)
    small = rng.randrange(5, 15)
    return {
        "name": bake.name,
        "make": bake.make(),
        "pronoun": bake.pronoun(),
        "Pronoun": ("they" if bake.plural else "it").capitalize(),
        "was": "were" if bake.plural else "was",
        "is_": "are" if bake.plural else "is",
        "does": "do" if bake.plural else "does",
        "pronoun_subject": "they" if bake.plural else "it",
        "warm_up": rng.choice((30, 45, 60)),
        "cool": rng.choice((10, 15, 20)),
        "celsius": celsius,
        "fahrenheit": round((celsius * 9 / 5 + 32) / 5) * 5,
        "fan": celsius - 20,
        "lower": celsius - rng.choice((10, 15, 20)),
        "minutes": rng.randint(*bake.minutes),
        "doneness": bake.doneness,
        "knead": rng.randint(8, 12),
        "rise": rng.choice((1, 2)),
        "prove": rng.choice((30, 40, 45, 60)),
        "chill": rng.choice((20, 30, 45, 60)),
        "cream": rng.randint(3, 5),
        "days": rng.randint(2, 5),
        "early": rng.choice((5, 10)),
        "amount": amount,
        "three_quarters": amount * 3 // 4,
        "small": small,
        "triple": 3 * small,
        "feed": rng.choice((50, 75, 100)),
        "raising": "yeast" if bake.kind == "bread" else "baking powder",
    }


def _quantity(ingredient: Ingredient, rng: random.Random) -> str:
    """E.g. "250 g of butter", "2 teaspoons of salt", "1 egg"."""
    name, unit, low, high = ingredient.name, ingredient.unit, ingredient.low, ingredient.high
    if unit in ("g", "ml"):
        step = 25 if high - low >= 50 else 1
        return f"{rng.randrange(-(-low // step) * step, high + 1, step)} {unit} of {name}"
    count = rng.randint(low, high)
    if unit:
        return f"{count} {unit.removesuffix('s') if count == 1 else unit} of {name}"
    return f"{count} {name.removesuffix('s') if count == 1 else name}"


_QuestionAnswer = Callable[[Bake, dict[str, Any], random.Random, BakingTexts], tuple[str, str]]


def _recipe(bake: Bake, values: dict[str, Any], rng: random.Random, texts: BakingTexts) -> tuple[str, str]:
    ingredients = [_quantity(ingredient, rng) for ingredient in bake.ingredients]
    listing = ", ".join(ingredients[:-1]) + " and " + ingredients[-1]
    answer = texts.recipe_intro.format(name=bake.name, listing=listing) + texts.methods[bake.kind].format(**values)
    return rng.choice(texts.questions["recipe"]).format(**values), answer


def _temperature(bake: Bake, values: dict[str, Any], rng: random.Random, texts: BakingTexts) -> tuple[str, str]:
    return rng.choice(texts.questions["temperature"]).format(**values), texts.temperature.format(**values)


def _problem(bake: Bake, values: dict[str, Any], rng: random.Random, texts: BakingTexts) -> tuple[str, str]:
    problem = rng.choice(list(texts.problems))
    question = rng.choice(texts.questions["problem"]).format(problem=problem, **values)
    return question, texts.problems[problem].format(**values)


def _substitution(bake: Bake, values: dict[str, Any], rng: random.Random, texts: BakingTexts) -> tuple[str, str]:
    new, old, answer = rng.choice(texts.substitutions)
    question = rng.choice(texts.questions["substitution"]).format(new=new, old=old, **values)
    return question, answer.format(**values)


def _storage(bake: Bake, values: dict[str, Any], rng: random.Random, texts: BakingTexts) -> tuple[str, str]:
    return rng.choice(texts.questions["storage"]).format(**values), texts.storage[bake.kind].format(**values)


def _technique(bake: Bake, values: dict[str, Any], rng: random.Random, texts: BakingTexts) -> tuple[str, str]:
    questions, answer = rng.choice(texts.techniques)
    return rng.choice(questions), answer.format(**values)


_QUESTION_ANSWERS: dict[str, _QuestionAnswer] = {
    "recipe": _recipe,
    "temperature": _temperature,
    "problem": _problem,
    "substitution": _substitution,
    "storage": _storage,
    "technique": _technique,
}
