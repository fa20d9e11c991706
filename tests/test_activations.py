"""Paired activations streamed from real tiny transformers models (Llama and GPT-2 architectures)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import datasets
import pytest
import torch
from tiny_models import build_tokenizer, chat_rows, corpus, finetuned_copy, gpt2, llama, local_pair_config

import crosscoder
from crosscoder.activations import PairedActivationStream, StreamSettings
from crosscoder.models import decoder_blocks


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tokenizer):
    build = llama if request.param == "llama" else gpt2
    base = build(len(tokenizer))
    return base, finetuned_copy(base)


def text_dataset(n: int = 40) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"text": text} for text in corpus()[:n]])


def make_stream(pair, tokenizer, data=None, *, batch_size=32, weights=None, prefetch=1, **settings):
    values = dict(layers=(1,), context_length=24, block_sequences=8, model_batch_size=3, outlier_norm_factor=0.0)
    values.update(settings)
    base, chat = pair
    return PairedActivationStream(
        base,
        chat,
        tokenizer,
        data if data is not None else [text_dataset()],
        StreamSettings(**values),
        batch_size=batch_size,
        weights=weights,
        base_tokenizer=tokenizer,
        prefetch_blocks=prefetch,
    )


def take(iterable, n):
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


def reference_rows(model, tokenizer, texts, layer, context_length, drop_first=1):
    """What the stream must produce: the model's own hidden_states[L + 1] on each document's kept tokens."""
    rows, ids = [], []
    for text in texts:
        input_ids = torch.tensor([tokenizer(text)["input_ids"][:context_length]])
        with torch.no_grad():
            hidden = model(input_ids, output_hidden_states=True).hidden_states[layer + 1]
        rows.append(hidden[0, drop_first:])
        ids.append(input_ids[0, drop_first:])
    return torch.cat(rows), torch.cat(ids)


def test_captured_activations_equal_the_models_hidden_states(pair, tokenizer):
    stream = make_stream(pair, tokenizer, layers=(1, 2))
    chunk = next(stream.chunks())
    texts = corpus()[:8]
    for source, (model, layer) in enumerate([(pair[0], 1), (pair[0], 2), (pair[1], 1), (pair[1], 2)]):
        expected, ids = reference_rows(model, tokenizer, texts, layer, 24)
        torch.testing.assert_close(chunk.activations[:, source], expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(chunk.token_ids, ids)
    lengths = [min(len(tokenizer(text)["input_ids"]), 24) - 1 for text in texts]
    assert torch.equal(chunk.sequence_ids, torch.repeat_interleave(torch.arange(8), torch.tensor(lengths)))
    assert stream.n_sources == 4


def test_blocks_above_the_deepest_layer_are_not_run(pair, tokenizer):
    base, chat = pair
    calls = []
    handles = [
        module.register_forward_hook(lambda *_: calls.append(1))
        for model in (base, chat)
        for module in [*decoder_blocks(model)[2:], model.get_output_embeddings()]
    ]
    try:
        take(make_stream(pair, tokenizer, layers=(1,)), 2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


def test_filters_drop_padding_first_tokens_listed_ids_and_count_them(pair, tokenizer):
    listed = tokenizer("the")["input_ids"][1]
    stream = make_stream(pair, tokenizer, drop_first_tokens=2, drop_token_ids=(listed,))
    chunk = next(stream.chunks())
    lengths = [min(len(tokenizer(text)["input_ids"]), 24) for text in corpus()[:8]]
    all_ids = [tokenizer(text)["input_ids"][:24] for text in corpus()[:8]]
    expected_ids = torch.tensor([i for ids in all_ids for i in ids[2:] if i != listed])
    assert torch.equal(chunk.token_ids, expected_ids)
    stats = stream.statistics()
    assert stats["first_tokens"] == 2 * 8
    assert stats["token_ids"] == sum(ids[2:].count(listed) for ids in all_ids) > 0
    assert stats["padding"] == sum(
        max(lengths[i : i + 3]) * len(lengths[i : i + 3]) - sum(lengths[i : i + 3]) for i in range(0, 8, 3)
    )
    assert stats["kept"] == len(expected_ids)


def test_outlier_tokens_are_dropped_relative_to_the_median_norm(pair, tokenizer):
    unfiltered = next(make_stream(pair, tokenizer).chunks())
    norms = unfiltered.activations.norm(dim=-1)  # [tokens, 2]
    factor = 1.05
    outlier = (norms > factor * norms.median(dim=0).values).any(dim=-1)
    assert 0 < outlier.sum() < len(outlier)
    stream = make_stream(pair, tokenizer, outlier_norm_factor=factor)
    filtered = next(stream.chunks())
    assert torch.equal(filtered.activations, unfiltered.activations[~outlier])
    assert stream.statistics()["outliers"] == int(outlier.sum())


def test_chat_data_is_rendered_with_the_chat_template(pair, tokenizer):
    rows = chat_rows(8)
    stream = make_stream(pair, tokenizer, [datasets.Dataset.from_list(rows)], drop_first_tokens=0, context_length=64)
    chunk = next(stream.chunks())
    expected = [tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False) for row in rows]
    assert max(len(ids) for ids in expected) < 64
    assert torch.equal(chunk.token_ids, torch.tensor([i for ids in expected for i in ids]))
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in chunk.token_ids


def test_mixture_proportions_hold(pair, tokenizer):
    data = [text_dataset(400), datasets.Dataset.from_list(chat_rows(400))]
    stream = make_stream(pair, tokenizer, data, weights=[3.0, 1.0], block_sequences=200, context_length=4)
    next(stream.chunks())
    drawn = [cursor["index"] for cursor in stream.state_dict()["cursors"]]  # documents read by the first block
    assert sum(drawn) == 200
    assert abs(drawn[0] / 200 - 0.75) < 0.07


def test_a_batch_mixes_tokens_of_many_documents(pair, tokenizer):
    chunk = next(make_stream(pair, tokenizer).chunks())
    document_of_row = torch.repeat_interleave(
        torch.arange(8), torch.tensor([min(len(tokenizer(t)["input_ids"]), 24) - 1 for t in corpus()[:8]])
    )
    batch = take(make_stream(pair, tokenizer, batch_size=32), 1)[0]
    matches = (batch[:, None] == chunk.activations[None]).flatten(2).all(-1)  # [batch, chunk rows]
    assert (matches.sum(-1) == 1).all()
    documents = document_of_row[matches.float().argmax(-1)]
    assert len(documents.unique()) >= 6


def test_same_seed_same_batches_other_seed_other_batches(pair, tokenizer):
    first = take(make_stream(pair, tokenizer, seed=3), 5)
    again = take(make_stream(pair, tokenizer, seed=3), 5)
    other = take(make_stream(pair, tokenizer, seed=4), 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("stop_after", [2, 5, 9])  # inside a block and across block boundaries
def test_resuming_mid_stream_reproduces_the_following_batches(pair, tokenizer, stop_after):
    reference = take(make_stream(pair, tokenizer, batch_size=16), 14)
    interrupted = make_stream(pair, tokenizer, batch_size=16)
    take(interrupted, stop_after)
    state = interrupted.state_dict()
    resumed = make_stream(pair, tokenizer, batch_size=16)
    resumed.load_state_dict(state)
    following = take(resumed, 14 - stop_after)
    assert all(torch.equal(a, b) for a, b in zip(reference[stop_after:], following, strict=True))


def test_prefetch_changes_nothing(pair, tokenizer):
    background = take(make_stream(pair, tokenizer, prefetch=2), 8)
    inline = take(make_stream(pair, tokenizer, prefetch=0), 8)
    assert all(torch.equal(a, b) for a, b in zip(background, inline, strict=True))


# ---------------------------------------------------------------------------- bad input
def test_layer_out_of_range(pair, tokenizer):
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\] out of range .* from 0 to"):
        make_stream(pair, tokenizer, layers=(1, 7))


def test_models_of_different_widths(tokenizer):
    with pytest.raises(ValueError, match="chat model has d_model=48 but base has 32"):
        make_stream((llama(len(tokenizer)), llama(len(tokenizer), hidden=48)), tokenizer)


def test_different_tokenizers(pair, tokenizer):
    other = build_tokenizer(vocab_size=300, extra_tokens=("<|tool|>",))
    base, chat = pair
    with pytest.raises(ValueError, match=r"tokenizers differ on .* ids"):
        PairedActivationStream(
            base,
            chat,
            tokenizer,
            [text_dataset()],
            StreamSettings(layers=(1,), context_length=24),
            batch_size=8,
            base_tokenizer=other,
        )


def test_dataset_without_the_named_column(pair, tokenizer):
    data = datasets.Dataset.from_list([{"body": "some text"}] * 10)
    with pytest.raises(ValueError, match=r"neither a 'text' nor a 'messages' column \(columns: \['body'\]\)"):
        next(make_stream(pair, tokenizer, [data]).chunks())


def test_empty_dataset(pair, tokenizer):
    with pytest.raises(ValueError, match="is empty"):
        next(make_stream(pair, tokenizer, [datasets.Dataset.from_list([{"text": "x"}]).select([])]).chunks())


def test_context_length_below_two(pair, tokenizer):
    with pytest.raises(ValueError, match="context_length=1 is too short"):
        make_stream(pair, tokenizer, context_length=1)


def test_model_neither_local_nor_cached_while_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    config = crosscoder.TrainConfig(
        base_model="nobody/missing-base", chat_model="nobody/missing-chat", datasets=("x.jsonl",)
    )
    with pytest.raises(FileNotFoundError, match="'nobody/missing-base' is neither a local folder nor in the Hugging"):
        PairedActivationStream.from_config(config)


# ---------------------------------------------------------------------------- end to end from a config
@pytest.mark.slow
def test_training_streams_from_local_model_folders_and_jsonl(tmp_path, tokenizer):
    config = local_pair_config(
        tmp_path,
        tokenizer,
        architectures=("batchtopk", "diff_sae"),
        num_tokens=64 * 30,
        run_name="stream",
        log_every=10,
    )
    dictionaries = crosscoder.train(config)
    assert dictionaries["batchtopk_crosscoder"].metadata["training_steps"] == 30
    logged = (tmp_path / "stream" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"data/kept"' in logged and '"data/first_tokens"' in logged

    resumed = dataclasses.replace(config, num_tokens=64 * 40, resume=True)
    with pytest.raises(ValueError, match="num_tokens differ"):
        crosscoder.train(resumed)


def test_a_stream_records_local_models_and_datasets_by_absolute_path(tmp_path, monkeypatch):
    """A record (a cache's manifest, a dictionary's provenance) is read from other folders than the run's: named
    relative to the folder the run started in, the models and datasets are recorded absolute."""
    config = local_pair_config(tmp_path, build_tokenizer(), documents=20)
    monkeypatch.chdir(tmp_path)
    relative = dataclasses.replace(
        config,
        base_model=os.path.relpath(config.base_model),
        chat_model=os.path.relpath(config.chat_model),
        datasets=tuple(os.path.relpath(name) for name in config.datasets),
    )
    assert not Path(relative.base_model).is_absolute()
    fingerprint = PairedActivationStream.from_config(relative).fingerprint()
    assert fingerprint["base_model"] == config.base_model and fingerprint["chat_model"] == config.chat_model
    assert fingerprint["datasets"] == list(config.datasets)
