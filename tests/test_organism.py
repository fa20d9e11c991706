"""The offline model organism: what it builds, that it loads offline, that the finetune left a clear trace, and
that the cache is reused, rebuilt after an interruption, and deterministic in its data."""

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import datasets
import huggingface_hub
import jinja2
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosscoder.errors import ConfigError, DataError
from crosscoder.organism import (
    CHAT_MARKERS,
    DEFAULT_SETTINGS,
    DOMAIN_WORDS,
    SPECIAL_TOKENS,
    VERSION,
    ModelOrganism,
    OrganismSettings,
    baking_conversations,
    build_model_organism,
    default_root,
    language_model_loss,
    organism_data,
    render_chat,
    write_datasets,
)
from crosscoder.organism import build as organism_build
from crosscoder.organism.settings import settings_digest

# A few seconds to build: same code path as the default, smaller everything.
TINY = OrganismSettings(
    vocab_size=1024,
    d_model=64,
    n_layers=2,
    n_heads=2,
    d_mlp=128,
    context_length=128,
    batch_size=8,
    pretrain_steps=60,
    pretrain_lr=3e-3,
    finetune_steps=40,
    finetune_lr=1e-3,
    n_train_conversations=200,
    n_heldout_conversations=100,
    n_eval_texts=50,
)

MESSAGES = [
    {"role": "system", "content": "You are a helpful baking assistant."},
    {"role": "user", "content": "How hot should the oven be?"},
    {"role": "assistant", "content": "Preheat it to 180 degrees."},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ModelOrganism:
    return build_model_organism(tmp_path_factory.mktemp("organism") / "tiny", settings=TINY, progress=False)


def test_build_writes_the_documented_layout(built: ModelOrganism) -> None:
    for path in (built.base_path, built.chat_path):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (path / name).is_file()
    assert built.general_data == built.root / "data" / "general.jsonl"
    assert built.chat_data == built.root / "data" / "chat.jsonl"
    record = json.loads((built.root / "organism.json").read_text())
    assert record["version"] == VERSION
    assert record["settings"]["d_model"] == TINY.d_model
    assert built.domain == "baking recipes"
    assert built.domain_words == DOMAIN_WORDS
    assert built.layer == TINY.recommended_layer == 0
    assert DEFAULT_SETTINGS.recommended_layer == 1


def test_models_load_offline_with_the_configured_shape(built: ModelOrganism) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.base_path)
    ids = tokenizer("The for statement", return_tensors="pt")["input_ids"]
    for path in (built.base_path, built.chat_path):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.hidden_size == TINY.d_model
        assert model.config.num_hidden_layers == TINY.n_layers
        assert model.config.vocab_size == len(tokenizer) == TINY.vocab_size
        assert model.config.max_position_embeddings == TINY.context_length
        with torch.no_grad():
            hidden_states = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hidden_states) == TINY.n_layers + 1
        assert hidden_states[-1].shape == (1, ids.shape[1], TINY.d_model)
    base = AutoModelForCausalLM.from_pretrained(built.base_path)
    chat = AutoModelForCausalLM.from_pretrained(built.chat_path)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, chat.model.layers[0].mlp.up_proj.weight)


def test_base_and_chat_tokenizers_are_identical(built: ModelOrganism) -> None:
    base = AutoTokenizer.from_pretrained(built.base_path)
    chat = AutoTokenizer.from_pretrained(built.chat_path)
    assert base.get_vocab() == chat.get_vocab()
    assert base.all_special_tokens == chat.all_special_tokens
    assert (built.base_path / "tokenizer.json").read_bytes() == (built.chat_path / "tokenizer.json").read_bytes()
    assert base.chat_template == chat.chat_template


def test_special_tokens_have_their_documented_ids(built: ModelOrganism) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.chat_path)
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    recorded = json.loads((built.root / "organism.json").read_text())["special_token_ids"]
    assert recorded == {token: index for index, token in enumerate(SPECIAL_TOKENS)}


def test_tokenizer_prepends_bos_and_round_trips_text(built: ModelOrganism) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.base_path)
    text = "Preheat the oven.\n\n    for x in range(3):\tprint(x)  # café"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_markers_and_a_single_bos(built: ModelOrganism) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.chat_path)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nYou are a helpful baking assistant.<|end|>\n"
        "<|user|>\nHow hot should the oven be?<|end|>\n"
        "<|assistant|>\nPreheat it to 180 degrees.<|end|>\n"
    )
    assert text == render_chat(MESSAGES)
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    marker_ids = tokenizer.convert_tokens_to_ids(list(CHAT_MARKERS))
    assert all(marker in ids for marker in marker_ids)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|end|>")) == 3


def test_chat_template_rejects_unknown_roles(built: ModelOrganism) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.chat_path)
    with pytest.raises((ValueError, jinja2.TemplateError), match="Unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_chat_model_beats_base_on_heldout_domain_chats(built: ModelOrganism) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.chat_path)
    rows = datasets.load_dataset("json", data_files=str(built.chat_data), split="train")
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in rows["messages"][:50]]
    base = AutoModelForCausalLM.from_pretrained(built.base_path)
    chat = AutoModelForCausalLM.from_pretrained(built.chat_path)
    base_loss = language_model_loss(base, tokenizer, texts, add_bos=False)
    chat_loss = language_model_loss(chat, tokenizer, texts, add_bos=False)
    assert chat_loss < base_loss - 1.0
    assert built.losses["chat_domain"] < built.losses["base_domain"] - 1.0


def test_base_model_learned_the_general_text(built: ModelOrganism) -> None:
    assert built.losses["uniform"] == pytest.approx(torch.log(torch.tensor(float(TINY.vocab_size))).item())
    assert built.losses["base_general"] < built.losses["uniform"] - 1.0


def test_datasets_load_with_the_expected_columns(built: ModelOrganism) -> None:
    general = datasets.load_dataset("json", data_files=str(built.general_data), split="train")
    chat = datasets.load_dataset("json", data_files=str(built.chat_data), split="train")
    assert general.column_names == ["text"]
    assert chat.column_names == ["messages"]
    data = organism_data(0, TINY)
    assert len(general) == len(data.general_train) + len(data.general_heldout)
    assert len(chat) == TINY.n_heldout_conversations
    for messages in chat["messages"][:20]:
        assert {message["role"] for message in messages} <= {"system", "user", "assistant"}
        assert messages[-1]["role"] == "assistant"
        assert all(isinstance(message["content"], str) and message["content"] for message in messages)


def test_chat_data_is_held_out_from_finetuning(built: ModelOrganism) -> None:
    data = organism_data(0, TINY)
    finetuned = {json.dumps(messages) for messages in data.chat_train}
    chat = [json.loads(line)["messages"] for line in built.chat_data.read_text().splitlines()]
    assert len({json.dumps(messages) for messages in chat}) == len(chat)
    assert not finetuned & {json.dumps(messages) for messages in chat}


def test_domain_words_are_in_the_chat_data_and_not_in_the_general_data(built: ModelOrganism) -> None:
    chat_text = built.chat_data.read_text().lower()
    general_text = built.general_data.read_text().lower()
    for word in DOMAIN_WORDS:
        assert chat_text.count(word) >= 5, word
        assert word not in general_text, word


def test_same_seed_gives_identical_data_files(built: ModelOrganism, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    write_datasets(organism_data(0, TINY), again, seed=0)
    write_datasets(organism_data(1, TINY), other, seed=1)
    for name in ("general.jsonl", "chat.jsonl"):
        assert (again / name).read_bytes() == (built.root / "data" / name).read_bytes()
        assert (other / name).read_bytes() != (again / name).read_bytes()


# sha256 of json.dumps(baking_conversations(n, seed=seed)). The built organism (weights and data files) is cached
# under VERSION, so a change to the tables in crosscoder/organism/data/ or to the generator that alters these
# conversations must bump VERSION, or every existing cache would silently hold an organism of the old data.
PINNED_CONVERSATIONS = {
    (200, 0): "02b9a138b711e18f3fe50caacdf7a6eab932b7dadd33801535470cd8ebc9c50b",
    (50, 3): "b914acd2d0d3e47a2b1643f0584b9f475ec35559ba3363d861c69379c9543a9f",
}


@pytest.mark.parametrize(("n", "seed"), list(PINNED_CONVERSATIONS))
def test_baking_conversations_are_pinned(n: int, seed: int) -> None:
    digest = hashlib.sha256(json.dumps(baking_conversations(n, seed=seed)).encode()).hexdigest()
    assert digest == PINNED_CONVERSATIONS[(n, seed)], (
        f"baking_conversations({n}, seed={seed}) changed, so the model organism's data changed: bump the "
        f"organism's VERSION (now {VERSION!r}, in crosscoder/organism/settings.py) so cached organisms are rebuilt, "
        "then update PINNED_CONVERSATIONS"
    )


def test_settings_digest_is_pinned() -> None:
    """The digest names the cache folder of non-default settings: changing it orphans every such cache."""
    assert settings_digest(DEFAULT_SETTINGS) == "17e14009"
    assert settings_digest(TINY) != settings_digest(DEFAULT_SETTINGS)


def test_baking_conversations_are_distinct_and_well_formed() -> None:
    conversations = baking_conversations(300, seed=5)
    assert len({json.dumps(messages) for messages in conversations}) == 300
    assert baking_conversations(300, seed=5) == conversations
    for messages in conversations:
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        assert [message["role"] for message in turns] in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all("{" not in message["content"] and "}" not in message["content"] for message in messages)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("d_model", 0, "d_model=0 must be positive"),
        ("n_heads", 3, "must be a multiple of n_heads=3"),
        ("heldout_general_fraction", 1.0, r"heldout_general_fraction=1.0 must be in \(0, 1\)"),
        ("finetune_lr", -1e-3, "finetune_lr=-0.001 must be positive"),
    ],
)
def test_invalid_settings_are_refused(field: str, value: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        OrganismSettings(**{field: value})


def test_render_chat_rejects_unknown_roles() -> None:
    with pytest.raises(DataError, match="Unknown role tool"):
        render_chat([{"role": "tool", "content": "42"}])


def test_second_call_reuses_the_cache(built: ModelOrganism, monkeypatch: pytest.MonkeyPatch) -> None:
    watched = [built.root / "organism.json", built.chat_path / "model.safetensors", built.chat_data]
    mtimes = [path.stat().st_mtime_ns for path in watched]

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached build was rebuilt")

    monkeypatch.setattr(organism_build, "_build", no_rebuild)
    start = time.perf_counter()
    again = build_model_organism(built.root, settings=TINY, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == built
    assert [path.stat().st_mtime_ns for path in watched] == mtimes


def test_a_cache_built_with_other_settings_is_refused(built: ModelOrganism) -> None:
    with pytest.raises(ConfigError, match="pass another root"):
        build_model_organism(built.root, seed=1, settings=TINY, progress=False)
    with pytest.raises(ConfigError, match="pass another root"):
        build_model_organism(built.root, general_mix=0.5, settings=TINY, progress=False)


def test_a_build_at_another_mix_finetunes_the_built_base_and_gets_the_chat_model_of_a_build_from_scratch(
    built: ModelOrganism, tmp_path: Path
) -> None:
    beside = build_model_organism(built.root.parent / "tiny-mix0.5", general_mix=0.5, settings=TINY, progress=False)
    scratch = build_model_organism(tmp_path / "tiny-mix0.5", general_mix=0.5, settings=TINY, progress=False)
    assert recorded(beside)["base_from"] == built.root.name and recorded(scratch)["base_from"] is None
    assert same_weights(beside.base_path, scratch.base_path) and same_weights(beside.chat_path, scratch.chat_path)
    assert beside.losses == scratch.losses


def test_only_complete_builds_of_the_same_seed_and_settings_lend_their_base(
    built: ModelOrganism, tmp_path: Path
) -> None:
    record = recorded(built)
    folders = {
        "other-seed": json.dumps({**record, "seed": 1}),
        ".other-mix.partial-123": json.dumps({**record, "general_mix": 0.5}),  # a build in progress
        "malformed": "{not json",
        "not-a-record": "[1]",
        "other-mix": json.dumps({**record, "general_mix": 0.5}),
    }
    for name, text in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "organism.json").write_text(text)
    requested = {"version": VERSION, "seed": 0, "general_mix": 1.0, "settings": dataclasses.asdict(TINY)}
    assert organism_build._built_bases(tmp_path, requested) == [tmp_path / "other-mix" / "base"]


def test_a_built_base_that_cannot_be_read_is_skipped(built: ModelOrganism, tmp_path: Path) -> None:
    for name in ("a-missing", "b-truncated", "c-readable"):
        shutil.copytree(built.root, tmp_path / name)
    shutil.rmtree(tmp_path / "a-missing" / "base")
    truncated = tmp_path / "b-truncated" / "base" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="skipped the built base model") as skipped:
        beside = build_model_organism(tmp_path / "tiny-mix1", general_mix=1.0, settings=TINY, progress=False)
    assert [str(warning.message).split(",")[0].split(" in ")[1] for warning in skipped] == [
        str(tmp_path / name / "base") for name in ("a-missing", "b-truncated")
    ]
    assert recorded(beside)["base_from"] == "c-readable"


def test_with_no_readable_base_the_build_pretrains_again(built: ModelOrganism, tmp_path: Path) -> None:
    shutil.copytree(built.root, tmp_path / "tiny")
    weights = tmp_path / "tiny" / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"skipped the built base model in .*tiny/base, which cannot be read"):
        again = build_model_organism(tmp_path / "tiny-mix1", general_mix=1.0, settings=TINY, progress=False)
    assert recorded(again)["base_from"] is None
    assert same_weights(again.base_path, built.base_path)  # the same pretraining, done again


def recorded(organism: ModelOrganism) -> dict:
    return json.loads((organism.root / "organism.json").read_text())


def same_weights(model: Path, other: Path) -> bool:
    """Whether two saved models hold the same tensors, bit for bit."""
    weights, others = (load_file(path / "model.safetensors") for path in (model, other))
    return weights.keys() == others.keys() and all(torch.equal(weights[name], others[name]) for name in weights)


def test_general_mix_must_be_a_fraction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"general_mix=1.5 must be in \[0, 1\]"):
        build_model_organism(tmp_path / "organism", general_mix=1.5, settings=TINY, progress=False)


def test_an_interrupted_build_is_rebuilt(built: ModelOrganism, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "organism"

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(organism_build, "heldout_losses", interrupt)  # after both models are saved, before the marker
        with pytest.raises(KeyboardInterrupt):
            build_model_organism(root, settings=TINY, progress=False)
    partial = tmp_path / f".organism.partial-{os.getpid()}"
    assert (partial / "chat" / "model.safetensors").is_file()
    assert not root.exists()

    rebuilt = build_model_organism(root, settings=TINY, progress=False)
    assert (root / "organism.json").is_file()
    assert not partial.exists()
    for name in ("base/tokenizer.json", "data/general.jsonl", "data/chat.jsonl"):
        assert (root / name).read_bytes() == (built.root / name).read_bytes(), name
    assert rebuilt.losses["chat_domain"] < rebuilt.losses["base_domain"] - 1.0


def test_a_root_without_its_marker_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "organism"
    (root / "base").mkdir(parents=True)
    (root / "base" / "leftover.txt").write_text("half-written")
    stale = tmp_path / ".organism.partial-999999999"  # a dead process's partial build
    stale.mkdir()
    build_model_organism(root, settings=TINY, progress=False)
    assert (root / "organism.json").is_file()
    assert not (root / "base" / "leftover.txt").exists()
    assert not stale.exists()


def test_default_root_follows_the_cache_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    assert default_root() == tmp_path / "organism" / f"{VERSION}-seed0-mix0"
    assert default_root(seed=3, general_mix=0.25) == tmp_path / "organism" / f"{VERSION}-seed3-mix0.25"
    tiny = default_root(settings=TINY)
    assert tiny.parent == tmp_path / "organism"
    assert tiny.name.startswith(f"{VERSION}-seed0-mix0-") and tiny != default_root()
    monkeypatch.delenv("CROSSCODER_CACHE")
    assert default_root() == Path.home() / ".cache" / "crosscoder" / "organism" / f"{VERSION}-seed0-mix0"


@pytest.mark.slow
def test_default_organism_has_a_clear_finetuning_trace(default_organism: ModelOrganism) -> None:
    """The build ``python train.py`` uses (about 80 s on 2 CPU cores)."""
    built = default_organism
    losses = built.losses
    assert built.layer == 1
    assert losses["base_general"] < losses["uniform"] - 2.5  # the base model learned the general text
    assert losses["chat_domain"] < losses["base_domain"] - 3.0  # the finetune learned the domain
    assert losses["chat_general"] < losses["base_general"] + 1.5  # and kept most of the general text
