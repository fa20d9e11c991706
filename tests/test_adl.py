"""The Activation Difference Lens (docs/methods.md §10) on tiny random-weight models: each piece equals a
hand-written computation, runs on Llama, Gemma-2, Qwen-3 and GPT-2 architectures, talks to a grader over HTTP, and
refuses bad inputs with a message that says what is wrong."""

import json
import math
import shutil
import socket
import subprocess
import warnings

import mock_endpoint
import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    build_tokenizer,
    chat_rows,
    corpus,
    finetuned_copy,
    gemma2,
    gpt2,
    llama,
    qwen3,
    save_pair,
    write_jsonl,
)

from crosscoder.errors import ConfigError, DataError
from crosscoder.eval import adl
from crosscoder.eval.adl.__main__ import main
from crosscoder.eval.adl.patchscope import patched_distributions
from crosscoder.eval.kl import assistant_token_mask
from crosscoder.models import residual_outputs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


FAMILIES = {"llama": llama, "gemma2": gemma2, "qwen3": qwen3, "gpt2": gpt2}


@pytest.fixture(scope="module")
def pair(tokenizer):
    base = llama(len(tokenizer))
    return base, finetuned_copy(base, scale=0.2)


def texts() -> list[str]:
    return corpus()[:40]


# ---------------------------------------------------------------------------- mean differences
def test_mean_differences_equal_a_brute_force_computation(pair, tokenizer, tmp_path):
    base, chat = pair
    n, layers = 8, [1, 2]
    documents = ["hi", *texts()[:9], "a b", *texts()[9:14]]  # two too short
    with pytest.warns(UserWarning, match="2 of 16 texts had fewer than 8 tokens"):
        means = adl.mean_differences(base, chat, tokenizer, documents, layers, n_positions=n, batch_size=4)
    kept = [text for text in documents if len(tokenizer(text)["input_ids"]) >= n]
    assert (means.n_samples, means.n_dropped) == (len(kept), 2) == (14, 2)

    hidden = {"base": {layer: [] for layer in layers}, "chat": {layer: [] for layer in layers}}
    for text in kept:
        ids = torch.tensor([tokenizer(text)["input_ids"][:n]])
        for name, model in (("base", base), ("chat", chat)):
            with torch.no_grad():
                states = model(ids, output_hidden_states=True).hidden_states
            for layer in layers:
                hidden[name][layer].append(states[layer + 1][0].double())
    for layer in layers:
        h_base, h_chat = torch.stack(hidden["base"][layer]), torch.stack(hidden["chat"][layer])
        torch.testing.assert_close(means.base_mean[layer], h_base.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(means.chat_mean[layer], h_chat.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(means.delta[layer], (h_chat - h_base).mean(0), atol=1e-5, rtol=1e-5)
        for name, h in (("base", h_base), ("chat", h_chat)):
            assert means.norms[name][layer] == pytest.approx(float(h[:, 5:].norm(dim=-1).mean()), rel=1e-6)

    paths = means.save(tmp_path)
    assert paths.means.exists() and json.loads(paths.means_meta.read_text())["n_dropped_short"] == 2
    loaded = adl.MeanDifferences.load(tmp_path)
    torch.testing.assert_close(loaded.delta[2], means.delta[2])
    assert loaded.norms == means.norms and loaded.n_samples == 14


def test_chat_data_means_equal_a_brute_force_computation(pair, tokenizer, tmp_path):
    """Positions −3…−1 (the last tokens before the first assistant message) and 0…n−1 (its first tokens), each
    conversation rendered with the chat template and run whole, one at a time."""
    base, chat = pair
    k, n, layers = 3, 4, [1, 2]
    conversations = chat_rows(7)
    conversations[2]["messages"][0]["content"] = "A much longer question about bread, flour, ovens and yeast?"
    conversations.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}]})
    conversations.append(
        {"messages": [{"role": "system", "content": "You bake."}, *chat_rows(1)[0]["messages"],
                      {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes, more flour."}]}
    )  # fmt: skip
    with pytest.warns(UserWarning, match="1 of 9 conversations had fewer than 3 tokens before or 4 tokens"):
        means = adl.chat_mean_differences(base, chat, tokenizer, conversations, layers, n_positions=n, k=k,
                                          batch_size=4)  # fmt: skip
    assert (means.n_samples, means.n_dropped, means.first_position) == (8, 1, -3)
    assert means.positions == [-3, -2, -1, 0, 1, 2, 3]

    windows = {"base": {layer: [] for layer in layers}, "chat": {layer: [] for layer in layers}}
    for row in conversations[:7] + conversations[8:]:
        messages = row["messages"]
        first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        render = tokenizer.apply_chat_template
        start = len(render(messages[:first_assistant], add_generation_prompt=True, return_dict=False))
        ids = torch.tensor([render(messages, return_dict=False)[: start + n]])
        for name, model in (("base", base), ("chat", chat)):
            with torch.no_grad():
                states = model(ids, output_hidden_states=True).hidden_states
            for layer in layers:
                windows[name][layer].append(states[layer + 1][0, start - k : start + n].double())
    for layer in layers:
        h_base, h_chat = torch.stack(windows["base"][layer]), torch.stack(windows["chat"][layer])
        torch.testing.assert_close(means.base_mean[layer], h_base.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(means.delta[layer], (h_chat - h_base).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(means.vector("chat_mean", layer, -3), h_chat.mean(0)[0], atol=1e-5, rtol=1e-5)
        assert means.norms["chat"][layer] == pytest.approx(float(h_chat[:, 5:].norm(dim=-1).mean()), rel=1e-6)
    with pytest.raises(ConfigError, match=r"outside the chat positions -3 … 3"):
        means.vector("delta", 1, -4)

    paths = means.save(tmp_path)
    assert paths.chat_means.exists() and not paths.means.exists()
    loaded = adl.MeanDifferences.load(tmp_path, variant="chat")
    assert loaded.first_position == -3 and loaded.variant == "chat"
    torch.testing.assert_close(loaded.vector("delta", 2, 3), means.vector("delta", 2, 3))


def test_max_samples_bounds_the_texts_and_the_default_layer_is_the_middle(pair, tokenizer):
    base, chat = pair
    means = adl.mean_differences(base, chat, tokenizer, texts(), n_positions=6, max_samples=5)
    assert means.n_samples == 5 and means.layers == [int(0.5 * (4 - 1))] == [1]
    assert means.vector("delta", 1, 5).shape == (32,)


# ---------------------------------------------------------------------------- the logit lens
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logit_lens_reads_a_vector_as_the_model_reads_its_last_hidden_state(family, tokenizer):
    """The lens of the last block's output is the model's own next-token distribution: the final norm, the
    unembedding and Gemma-2's logit soft-capping are all found and applied."""
    model = FAMILIES[family](len(tokenizer))
    ids = torch.tensor([tokenizer(texts()[0])["input_ids"][:10]])
    last_block = model.config.get_text_config().num_hidden_layers - 1
    hidden = residual_outputs(model, ids, torch.ones_like(ids), [last_block])[0, :, 0]  # [10, d]
    with torch.no_grad():
        expected = model(ids).logits[0].float()
    torch.testing.assert_close(adl.lens_logits(model, hidden), expected, atol=1e-4, rtol=1e-4)
    lens = adl.logit_lens(hidden[-1], model, tokenizer, k=5)
    probs = torch.softmax(expected[-1], -1)
    assert lens["token_ids"] == probs.topk(5).indices.tolist()
    assert lens["probs"] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-5)
    assert lens["tokens"] == [tokenizer.decode([i]) for i in lens["token_ids"]]
    inverse = torch.softmax(adl.lens_logits(model, -hidden[-1]), -1)
    assert lens["inverse"]["token_ids"] == inverse.topk(5).indices.tolist()
    if family == "gemma2":
        assert expected.abs().max() <= 5.0  # soft-capped


# ---------------------------------------------------------------------------- Patchscope
def hand_written_patched_probs(model, ids: torch.Tensor, layer: int, patch: torch.Tensor) -> torch.Tensor:
    """A Llama forward written out block by block, with block ``layer``'s output at the last position replaced."""
    inner = model.model
    positions = torch.arange(ids.shape[1])[None]
    hidden = inner.embed_tokens(ids)
    rotary = inner.rotary_emb(hidden, positions)
    for index, block in enumerate(inner.layers):
        out = block(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        hidden = out[0] if isinstance(out, tuple) else out
        if index == layer:
            hidden = hidden.clone()
            hidden[:, -1] = patch
    return torch.softmax(model.lm_head(inner.norm(hidden))[:, -1].float(), -1)


def test_patchscope_patch_equals_a_hand_written_forward(pair, tokenizer):
    _, chat = pair
    torch.manual_seed(3)
    vector, layer, norm, scales = torch.randn(32), 1, 2.5, [0.5, 2.0, 20.0]
    probs = patched_distributions(vector, chat, tokenizer, layer, scales, norm=norm)  # [prompts, scales, vocab]
    assert probs.shape == (3, 3, len(tokenizer))
    for p, prompt in enumerate(adl.IDENTITY_PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        for s, scale in enumerate(scales):
            with torch.no_grad():
                expected = hand_written_patched_probs(chat, ids, layer, scale * norm * vector / vector.norm())
            torch.testing.assert_close(probs[p, s], expected[0], atol=1e-5, rtol=1e-4)


def test_patchscope_keeps_tokens_in_every_prompts_top_set_and_averages_them(pair, tokenizer):
    _, chat = pair
    torch.manual_seed(4)
    vector, scales = torch.randn(32), [1.0, 4.0]
    result = adl.patchscope(vector, chat, tokenizer, 2, scales, norm=3.0, top_k=30, keep=5)
    probs = patched_distributions(vector, chat, tokenizer, 2, scales, norm=3.0)
    for s, candidate in enumerate(result["scales"]):
        tops = [set(probs[p, s].topk(30).indices.tolist()) for p in range(3)]
        in_all = set.intersection(*tops)
        averaged = {token: float(probs[:, s, token].mean()) for token in in_all}
        best = sorted(averaged, key=averaged.get, reverse=True)[:5]
        assert candidate["token_ids"] == best
        assert candidate["probs"] == pytest.approx([averaged[t] for t in best], rel=1e-5)
        own = [set(probs[p, s].topk(5).indices.tolist()) for p in range(3)]
        assert candidate["agreement"] == pytest.approx(sum(len(set(best) & o) for o in own) / (3 * len(best)))
    assert result["scale"] in scales and result["grader"] == "offline"
    json.dumps(result)


def test_default_scales_are_the_published_grid():
    scales = adl.DEFAULT_SCALES
    assert scales[:16] == tuple(round(0.5 + 0.1 * i, 1) for i in range(16))
    assert {3.0, 4.0, 5.0, 10.0, 20.0, 40.0, 200.0} <= set(scales) and len(scales) == 16 + 5 + 9


def test_offline_grader_prefers_agreement_then_the_smaller_scale():
    grader = adl.OfflineGrader()
    candidates = [
        {"scale": 0.5, "tokens": ["a"], "agreement": 0.4},
        {"scale": 2.0, "tokens": ["b"], "agreement": 0.9},
        {"scale": 1.0, "tokens": ["c"], "agreement": 0.9},
        {"scale": 5.0, "tokens": ["d"], "agreement": 0.1},
    ]
    assert grader.choose_scale(candidates)[0] == 2


# ---------------------------------------------------------------------------- the LLM grader protocol
@pytest.fixture
def endpoint():
    with mock_endpoint.serve() as served:
        yield served


def test_llm_grader_protocol_against_a_local_mock_server(endpoint, monkeypatch, pair, tokenizer):
    url, mock = endpoint
    monkeypatch.setenv("ADL_TEST_KEY", "sk-test-secret")
    grader = adl.LLMGrader(url, "judge-model", api_key_env="ADL_TEST_KEY")
    candidates = [{"scale": s, "tokens": [f"t{s}"], "agreement": 1.0} for s in (1.0, 2.0, 3.0)]
    mock.script += ["The most coherent list is 3.", "1: COHERENT\n2: INCOHERENT"]
    assert grader.choose_scale(candidates)[0] == 2
    assert grader.coherent("Tell me a story.", ["Once upon a time.", "zq zq zq"], offline=lambda: [False, False]) == [
        True,
        False,
    ]
    first = mock.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test-secret"
    assert first["body"]["model"] == "judge-model" and "'t3.0'" in first["body"]["messages"][1]["content"]
    assert "sk-test-secret" not in json.dumps(grader.describe())

    # the grader picks Patchscope's scale
    _, chat = pair
    mock.script.append("2")
    result = adl.patchscope(torch.ones(32), chat, tokenizer, 1, [1.0, 7.0, 9.0], norm=2.0, grader=grader)
    assert result["scale"] == 7.0 and result["grader"] == "llm:judge-model"
    # an answer that names no list: the offline choice, noted
    mock.script.append("I cannot decide.")
    with pytest.warns(UserWarning, match="no list number"):
        index, reason = grader.choose_scale(candidates)
    assert index == 0 and reason.startswith("offline fallback")


def candidate_lines(request: dict) -> list[str]:
    """The numbered candidate tokens of a relevance request, in the order sent."""
    content = request["body"]["messages"][1]["content"]
    return content.split("Candidate tokens:\n")[1].splitlines()


def test_llm_relevance_labels_three_cyclic_permutations_and_keeps_what_all_agree_on(endpoint):
    url, mock = endpoint
    grader = adl.LLMGrader(url, "judge-model")
    tokens, frequent = [" bake", " python", " oven", " the"], [" flour", " bake"]
    mock.script += [
        "1: RELEVANT\n2: IRRELEVANT\n3: RELEVANT\n4: RELEVANT",  # bake, python, oven, the
        "1: IRRELEVANT\n2: RELEVANT\n3: IRRELEVANT\n4: RELEVANT",  # python, oven, the, bake
        "1: RELEVANT\n2: RELEVANT\n3: RELEVANT\n4: RELEVANT",  # oven, the, bake, python
    ]
    labels, source = grader.relevant(tokens, "Baking recipes.", frequent, offline=lambda: [False] * 4)
    # all agree: " the" is relevant in two answers of three, so not relevant (a majority vote would keep it)
    assert labels == [True, False, True, False] and source == "llm:judge-model"
    assert [candidate_lines(request) for request in mock.requests] == [
        ["1. ' bake'", "2. ' python'", "3. ' oven'", "4. ' the'"],
        ["1. ' python'", "2. ' oven'", "3. ' the'", "4. ' bake'"],
        ["1. ' oven'", "2. ' the'", "3. ' bake'", "4. ' python'"],
    ]
    content = mock.requests[0]["body"]["messages"][1]["content"]
    assert "Baking recipes." in content and "' flour', ' bake'" in content
    assert "RELEVANT" in mock.requests[0]["body"]["messages"][0]["content"]

    # scores from the labels, probability-weighted as the trivial relevance is
    entry = {"tokens": tokens, "token_ids": [10, 11, 12, 13], "probs": [0.4, 0.3, 0.2, 0.1]}
    alternating = "1: RELEVANT\n2: IRRELEVANT\n3: RELEVANT\n4: IRRELEVANT"
    mock.script += [alternating, "1: IRRELEVANT\n2: RELEVANT\n3: IRRELEVANT\n4: RELEVANT", alternating]
    scores = adl.llm_relevance(entry, {13: 50}, None, grader, "Baking recipes.", frequent)
    assert scores["share"] == 0.5 and scores["weighted"] == pytest.approx(0.6)
    assert scores["relevant"] == [" bake", " oven"] and scores["labelled_by"] == "llm:judge-model"

    # one permutation left unlabelled: the trivial labels for the whole list, noted
    mock.script += ["1: RELEVANT\n2: RELEVANT\n3: RELEVANT\n4: RELEVANT", "1: RELEVANT"]
    with pytest.warns(UserWarning, match="did not label all 4 tokens"):
        scores = adl.llm_relevance(entry, {13: 50}, None, grader, "Baking recipes.", frequent)
    assert scores["relevant"] == [" the"] and scores["labelled_by"] == "offline fallback"
    assert any("did not label" in note for note in grader.describe()["notes"])


def test_an_unreachable_grader_falls_back_to_offline_and_says_so():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    grader = adl.LLMGrader(f"http://127.0.0.1:{port}/v1", "judge-model", timeout=5)
    candidates = [{"scale": 1.0, "tokens": ["a"], "agreement": 0.2}, {"scale": 2.0, "tokens": ["b"], "agreement": 0.8}]
    with pytest.warns(UserWarning, match="did not answer"):
        index, reason = grader.choose_scale(candidates)
    assert index == 1 and "offline" in reason
    assert grader.describe()["unreachable"] and "did not answer" in grader.describe()["unreachable"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked no more, warned no more
        assert grader.coherent("p", ["x"], offline=lambda: [True]) == [True]
        assert grader.relevant(["a", "b"], "d", ["f"], offline=lambda: [True, False]) == (
            [True, False],
            "offline fallback",
        )


# ---------------------------------------------------------------------------- relevance
def test_generic_tokens_and_frequent_tokens(tokenizer):
    assert all(adl.is_generic(t) for t in [" ", "a", " .", ",,", "\n\n", " the", " And", "--"])
    assert not any(adl.is_generic(t) for t in [" bake", "flour", " 175", " oven"])
    rows = [{"text": "the object of the class"}] * 12 + [{"messages": [{"role": "user", "content": "object"}]}] * 3
    frequent = adl.frequent_tokens(tokenizer, rows, min_count=10)
    decoded = {tokenizer.decode([t]): count for t, count in frequent.items()}
    assert not any(adl.is_generic(t) for t in decoded) and " the" not in decoded
    # " object" 12 times: the messages' contents hold "object" without a leading space, another token
    assert decoded[" object"] == decoded[" class"] == 12
    ids = tokenizer(" object", add_special_tokens=False)["input_ids"]
    entry = {"tokens": ["x", "y", "z", "w"], "token_ids": [ids[0], 999_999, ids[0], 5], "probs": [0.4, 0.3, 0.2, 0.1]}
    scores = adl.relevance(entry, frequent)
    assert scores["share"] == 0.5 and scores["weighted"] == pytest.approx(0.6) and scores["relevant"] == ["x", "z"]


# ---------------------------------------------------------------------------- steering
def test_steering_adds_the_vector_at_every_position_of_prompt_and_generation(pair, tokenizer):
    _, chat = pair
    vector, layer, strength, norm = torch.randn(32), 1, 3.0, 2.0
    addition = strength * norm * vector / vector.norm()
    seen = []
    block, following = chat.model.layers[layer], chat.model.layers[layer + 1]
    raw = block.register_forward_hook(lambda m, i, o: seen.append(["raw", (o[0] if isinstance(o, tuple) else o)]))
    nxt = following.register_forward_pre_hook(
        lambda m, args, kwargs: seen[-1].append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        steered = adl.generate(
            chat, tokenizer, "Tell me a story.", vector=vector, layer=layer, strength=strength, norm=norm,
            max_new_tokens=5, temperature=0.0,
        )  # fmt: skip
    finally:
        raw.remove()
        nxt.remove()
    prompt_length = len(steered[0].prompt_ids)
    assert seen[0][1].shape[1] == prompt_length and len(seen) == len(steered[0].ids)  # prompt, then one per token
    for _, before, after in seen:
        torch.testing.assert_close(after - before, addition.expand_as(before), atol=1e-5, rtol=1e-5)
    unsteered = adl.generate(chat, tokenizer, "Tell me a story.", max_new_tokens=5, temperature=0.0)
    assert adl.generate(chat, tokenizer, "Tell me a story.", vector=vector, layer=layer, strength=0.0,
                        max_new_tokens=5, temperature=0.0) == unsteered  # fmt: skip


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(pair, tokenizer):
    _, chat = pair
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = adl.steer(chat, tokenizer, torch.ones(32), 1, 1.0, ["Hi there"], n_samples=2, max_new_tokens=6, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = adl.steer(chat, tokenizer, torch.ones(32), 1, 1.0, ["Hi there"], n_samples=2, max_new_tokens=6, seed=7)
    assert first == again and first[0]["prompt"] == "Hi there" and len(first[0]["samples"]) == 2


def test_strength_search_finds_the_largest_coherent_strength(pair, tokenizer):
    _, chat = pair
    calls = []

    def judge(prompt, generations):  # coherent below strength 30, whatever the text
        calls.append(prompt)
        return [current[0] < 30] * len(generations)

    current = [0.0]
    original = adl.steering.generate

    def tracking(*args, **kwargs):
        current[0] = kwargs["strength"]
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adl.steering, "generate", tracking)
        result = adl.find_strength(chat, tokenizer, torch.ones(32), 1, "Hi", judge, steps=8, n_samples=1,
                                   max_new_tokens=2)  # fmt: skip
    assert 30 - 100 / 2**8 <= result["strength"] < 30 and len(result["trials"]) == 8 == len(calls)
    assert [t["strength"] for t in result["trials"][:3]] == [50.0, 25.0, 37.5]


def test_strength_search_over_three_prompts_averages_their_thresholds(monkeypatch, tokenizer):
    """[0, 100] on the first prompt, then [0, 2 × its threshold] on two more; the mean of the three thresholds."""
    thresholds = {"A": 30.0, "B": 20.0, "C": 90.0, "D": 1.0}  # C passes everywhere in [0, 2 × 30]; D is not searched
    asked = []

    def fake_generate(model, tokenizer, prompt, **kwargs):
        asked.append((prompt, kwargs["strength"], kwargs["seed"]))
        return [adl.Generation(prompt, (), ())] * kwargs["n_samples"]

    def judge(prompt, generations):  # a fake coherence judge: coherent below the prompt's threshold
        strength = asked[-1][1]
        return [strength < thresholds[prompt]] * len(generations)

    monkeypatch.setattr(adl.steering, "generate", fake_generate)
    steps = 8
    result = adl.search_strength(None, tokenizer, torch.ones(32), 1, list("ABCD"), judge, steps=steps, n_samples=4,
                                 seed=10)  # fmt: skip
    first, second, third = result["per_prompt"]
    assert [p["prompt"] for p in result["per_prompt"]] == ["A", "B", "C"] and len(asked) == 3 * steps
    assert first["range"] == [0.0, 100.0] and 30 - 100 / 2**steps <= first["strength"] < 30
    upper = 2 * first["strength"]
    assert second["range"] == third["range"] == [0.0, upper]
    assert second["trials"][0]["strength"] == first["strength"]  # the middle of [0, 2 s₁]
    assert 20 - upper / 2**steps <= second["strength"] < 20
    assert third["strength"] == pytest.approx(upper * (1 - 2**-steps))  # every tested strength passes
    expected = (first["strength"] + second["strength"] + third["strength"]) / 3
    assert result["strength"] == pytest.approx(expected)
    assert {prompt: seed for prompt, _, seed in asked} == {"A": 10, "B": 11, "C": 12}

    # nothing passes on the first prompt: every threshold is 0 and the other prompts are not searched
    thresholds["A"], asked[:] = 0.0, []
    result = adl.search_strength(None, tokenizer, torch.ones(32), 1, list("ABC"), judge, steps=4, n_samples=4)
    assert result["strength"] == 0.0 and [p["strength"] for p in result["per_prompt"]] == [0.0] * 3
    assert len(asked) == 4 and result["per_prompt"][1]["trials"] == []


def test_loss_coherence_compares_with_unsteered_samples(pair, tokenizer):
    _, chat = pair
    unsteered = adl.generate(chat, tokenizer, "Hi", n_samples=3, max_new_tokens=6)
    judge = adl.LossCoherence(chat, factor=1.5)
    reference = judge.set_reference("Hi", unsteered)
    losses = []
    for g in unsteered:
        ids = torch.tensor([list(g.prompt_ids) + list(g.ids)])
        with torch.no_grad():
            logits = chat(ids).logits[0, len(g.prompt_ids) - 1 : -1]
        losses.append(float(F.cross_entropy(logits, torch.tensor(g.ids))))
    assert reference == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert judge("Hi", unsteered) == [loss <= 1.5 * reference for loss in losses]
    with pytest.raises(ConfigError, match="set_reference"):
        judge("other prompt", unsteered)


def test_bag_of_tokens_cosine(tokenizer):
    domain = adl.bag_of_tokens(tokenizer, ["bake the bread in the oven"])
    assert adl.cosine(adl.bag_of_tokens(tokenizer, ["bake the bread in the oven"]), domain) == pytest.approx(1.0)
    assert adl.cosine(adl.bag_of_tokens(tokenizer, ["python classes"]), domain) == 0.0


# ---------------------------------------------------------------------------- causal effect
def test_causal_effect_of_a_direction(pair, tokenizer):
    base, chat = pair
    data = {"domain": chat_rows(4), "general": texts()[:4]}
    same = adl.causal_effect(chat, chat, tokenizer, torch.randn(32), 1, data, n_random=2, max_length=64)
    for result in same.values():
        # setting the projection to "the base model's" value, when the base is the chat model, changes nothing
        assert result["base_projection"] == pytest.approx(result["chat"], rel=1e-5)
        assert result["random_base_projection"]["values"] == pytest.approx([result["chat"]] * 2, rel=1e-5)
        assert result["project_out"] != pytest.approx(result["chat"], rel=1e-6)
    effect = adl.causal_effect(base, chat, tokenizer, torch.randn(32), 1, data, n_random=2, max_length=64)
    masks = [assistant_token_mask(tokenizer, row["messages"])[1] for row in chat_rows(4)]
    assistant_tokens = [sum(position >= 0 for position in mask[1:64]) for mask in masks]
    assert effect["domain"]["tokens"] == sum(assistant_tokens) > 0  # only assistant tokens are scored
    assert len(effect["general"]["random_project_out"]["values"]) == 2
    json.dumps(effect)


def test_random_activation_differences_are_normalised_chat_minus_base_on_drawn_tokens(pair, tokenizer):
    base, chat = pair
    general = texts()[:3]
    directions, drawn = adl.random_activation_differences(base, chat, tokenizer, general, 2, 6, seed=1, max_length=20)
    assert directions.shape == (6, 32) and len(set(drawn)) == 6 and all(5 <= p < 20 for _, p in drawn)
    for direction, (row, position) in zip(directions, drawn, strict=True):
        ids = torch.tensor([tokenizer(general[row])["input_ids"][:20]])
        with torch.no_grad():
            difference = (
                chat(ids, output_hidden_states=True).hidden_states[3]
                - base(ids, output_hidden_states=True).hidden_states[3]
            )
        expected = difference[0, position] / difference[0, position].norm()
        torch.testing.assert_close(direction, expected, atol=1e-5, rtol=1e-4)
    again, drawn_again = adl.random_activation_differences(base, chat, tokenizer, general, 2, 6, seed=1, max_length=20)
    assert drawn_again == drawn and torch.equal(again, directions)


def test_causal_effect_controls_and_the_losses_after_the_first_tokens(pair, tokenizer):
    base, chat = pair
    general, skip, max_length = texts()[:3], 20, 48
    effect = adl.causal_effect(base, chat, tokenizer, torch.randn(32), 2, {"general": general}, n_random=3,
                               n_random_differences=3, difference_texts=texts()[10:14], max_length=max_length,
                               skip=skip)["general"]  # fmt: skip
    directions, differences = effect["random_project_out"], effect["random_difference_project_out"]
    assert len(directions["values"]) == len(differences["values"]) == 3
    assert not set(directions["values"]) & set(differences["values"])  # a second family, not the same directions
    values = torch.tensor(differences["values"], dtype=torch.float64)
    assert differences["mean"] == pytest.approx(float(values.mean())) and differences["std"] == pytest.approx(
        float(values.std())
    )
    assert set(effect["random_difference_base_projection"]) == {"mean", "std", "max", "values"}
    # the losses after the first 20 tokens, by hand
    losses = []
    for text in general:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
        with torch.no_grad():
            logits = chat(ids).logits[0, :-1]
        losses.append(F.cross_entropy(logits, ids[0, 1:], reduction="none")[skip - 1 :])
    after = effect["after_first"]
    assert after["skip"] == skip and after["tokens"] == sum(len(loss) for loss in losses) < effect["tokens"]
    assert after["chat"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    assert len(after["random_difference_project_out"]["values"]) == 3 and math.isfinite(after["project_out"])
    with pytest.raises(ConfigError, match="difference_texts"):
        adl.causal_effect(base, chat, tokenizer, torch.randn(32), 2, {"general": general}, n_random_differences=1)


# ---------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_lens_runs_on_each_architecture(family, tokenizer):
    base = FAMILIES[family](len(tokenizer))
    chat = finetuned_copy(base, scale=0.1)
    means = adl.mean_differences(base, chat, tokenizer, texts()[:12], [2], n_positions=8)
    delta, norm = means.vector("delta", 2, 1), means.norms["chat"][2]
    lens = adl.logit_lens(delta, chat, tokenizer, k=5)
    scope = adl.patchscope(delta, chat, tokenizer, 2, [1.0, 10.0], norm=norm, keep=5)
    steered = adl.steer(chat, tokenizer, delta, 2, 1.0, ["Hello"], norm=norm, n_samples=1, max_new_tokens=3)
    causal = adl.causal_effect(base, chat, tokenizer, delta, 2, {"general": texts()[:2]}, n_random=1, max_length=12)
    for result in (lens, scope, steered, causal):
        json.dumps(result)
    assert len(lens["tokens"]) == 5 and len(scope["tokens"]) <= 5 and math.isfinite(causal["general"]["chat"])


def test_bfloat16_models_run_the_lens(pair, tokenizer):
    base, chat = (finetuned_copy(model, scale=0.0).to(torch.bfloat16) for model in pair)
    means = adl.mean_differences(base, chat, tokenizer, texts()[:8], [1], n_positions=8)
    assert means.delta[1].dtype == torch.float64
    lens = adl.logit_lens(means.vector("delta", 1, 2), chat, tokenizer, k=3)
    scope = adl.patchscope(means.vector("delta", 1, 2), chat, tokenizer, 1, [1.0], norm=means.norms["chat"][1])
    assert len(lens["tokens"]) == 3 and scope["tokens"]


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_their_messages(pair, tokenizer):
    base, chat = pair
    wide = llama(len(tokenizer), hidden=64)
    with pytest.raises(DataError, match="different widths: the base model has d_model=32 but the chat model has 64"):
        adl.mean_differences(base, wide, tokenizer, texts())
    other = build_tokenizer(extra_tokens=("<a>", "<b>"))  # every merged token two ids later
    with pytest.raises(DataError, match="different tokenizers"):
        adl.mean_differences(base, chat, tokenizer, texts(), base_tokenizer=other)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[4\] out of range .* 4 layers"):
        adl.mean_differences(base, chat, tokenizer, texts(), layers=[4])
    with pytest.raises(DataError, match="none of the 3 texts read has 8 tokens: all 3 were dropped as too short"):
        adl.mean_differences(base, chat, tokenizer, ["a", "b c", "d"], n_positions=8)
    means = adl.mean_differences(base, chat, tokenizer, texts()[:4], n_positions=4)
    with pytest.raises(ConfigError, match=r"position\(s\) \[4\] are beyond the 4 positions"):
        means.vector("delta", 1, 4)
    with pytest.raises(ConfigError, match="zero"):
        adl.patchscope(torch.zeros(32), chat, tokenizer, 1, [1.0])


# ---------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def lens_folder(tmp_path_factory, tokenizer):
    """The command run once on a saved tiny pair: a general corpus, finetuning chats, small settings."""
    root = tmp_path_factory.mktemp("adl")
    base = llama(len(tokenizer))
    base_path, chat_path = save_pair(root / "models", base, finetuned_copy(base, scale=0.2), tokenizer)
    general = write_jsonl(root / "general.jsonl", [{"text": text} for text in corpus()[:60]])
    domain = write_jsonl(root / "domain.jsonl", chat_rows(40))
    arguments = [
        "--base-model", str(base_path), "--chat-model", str(chat_path), "--datasets", str(general),
        "--domain-data", str(domain), "--chat-data", str(domain), "--layers", "1", "2", "--positions", "0", "3",
        "--n-positions", "8", "--max-samples", "30", "--patchscope-scales", "1", "4", "20", "--steer-samples", "2",
        "--steer-tokens", "4", "--search-steps", "2", "--causal-texts", "4", "--causal-random", "2",
        "--causal-random-differences", "2", "--causal-max-length", "64",
        "--min-count", "3", "--out", str(root / "out"), "--no-progress",
    ]  # fmt: skip
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(arguments) == 0
    finally:
        torch.set_num_threads(previous)
    return root, arguments


def test_the_command_writes_every_result_for_every_layer_and_position(lens_folder):
    root, _ = lens_folder
    paths = adl.LensPaths(root / "out")
    report = adl.load_report(paths.out)
    assert set(report["files"]) == set(paths.all()) and all(p.stat().st_size > 0 for p in paths.all().values())
    assert report["layers"] == [1, 2] and set(report["results"]) == {"1", "2"}
    assert report["counts"]["samples"] == 30 and report["grader"]["name"] == "offline"
    for layer in ("1", "2"):
        assert len(report["results"][layer]["difference_norms"]) == 8
        for position in ("0", "3"):
            entry = report["results"][layer]["positions"][position]
            for vector in adl.VECTORS:
                lens, scope = entry["logit_lens"][vector], entry["patchscope"][vector]
                assert len(lens["tokens"]) == len(lens["probs"]) == 100 and isinstance(lens["tokens"][0], str)
                assert scope["scale"] in (1.0, 4.0, 20.0) and len(scope["scales"]) == 3 and scope["tokens"]
                assert 0 <= entry["relevance"]["logit_lens"][vector]["share"] <= 1
            steering = entry["steering"]
            assert len(steering["samples"]) == len(adl.steering_prompts()) and "similarity" in steering
            assert [search["prompt"] for search in steering["search"]] == list(adl.steering_prompts()[:3])
            assert steering["strength"] == pytest.approx(sum(s["strength"] for s in steering["search"]) / 3)
            assert set(entry["causal_effect"]) == {"domain", "general"}
            for causal in entry["causal_effect"].values():
                assert len(causal["random_difference_project_out"]["values"]) == 2
                assert causal["after_first"]["skip"] == 20 and "std" in causal["random_project_out"]
    assert report["relevance_labels"].startswith("trivial only")


def test_the_command_reads_the_chat_data_around_the_assistant_turn(lens_folder):
    root, _ = lens_folder
    report = adl.load_report(root / "out")
    chat_data = report["chat_data"]
    assert chat_data["positions"] == [-3, -2, -1, 0, 3] and chat_data["first_position"] == -3
    assert chat_data["counts"]["samples"] > 0
    for layer in ("1", "2"):
        result = chat_data["results"][layer]
        assert len(result["difference_norms"]) == 3 + 8
        assert result["positions"]["-1"]["label"] == "1 before the assistant turn"
        assert result["positions"]["3"]["label"] == "assistant token 3"
        for entry in result["positions"].values():
            assert set(entry["logit_lens"]) == set(entry["patchscope"]) == set(adl.VECTORS)
            assert 0 <= entry["relevance"]["logit_lens"]["delta"]["share"] <= 1
    means = adl.MeanDifferences.load(root / "out", variant="chat")
    assert means.positions == list(range(-3, 8)) and means.n_samples == chat_data["counts"]["samples"]
    lens = adl.logit_lens_details(report, 2, -2, data="chat")
    assert lens["tokens"] == chat_data["results"]["2"]["positions"]["-2"]["logit_lens"]["delta"]["tokens"]
    assert adl.patchscope_details(report, 1, 0, "chat_mean", data="chat")["tokens"]


def test_the_python_api_reads_the_report(lens_folder):
    root, _ = lens_folder
    report = adl.load_report(root / "out" / "report.json")
    view = adl.overview(report, k=3)
    assert view["datasets"] == ["ds1"] and "general.jsonl" not in json.dumps(view)
    assert len(view["results"]["1"]["0"]["logit_lens"]) == 3
    assert len(view["results"]["2"]["3"]["steering"]["examples"]) == len(adl.steering_prompts())
    lens = adl.logit_lens_details(report, 1, 0, "base_mean", k=4)
    assert lens["tokens"] == report["results"]["1"]["positions"]["0"]["logit_lens"]["base_mean"]["tokens"][:4]
    scope = adl.patchscope_details(report, 2, 3, scale=20.0)
    assert scope["scale"] == 20.0 and [s["scale"] for s in scope["scales"]] == [1.0, 4.0, 20.0]
    assert adl.steering_details(report, 1, 3)["samples"] and adl.causal_effect_details(report, 2, 0)["general"]
    with pytest.raises(ConfigError, match=r"position 1 is not in the report \(positions: \[0, 3\]\)"):
        adl.logit_lens_details(report, 1, 1)
    with pytest.raises(ConfigError, match="layer 0 is not in the report"):
        adl.steering_details(report, 0, 0)


def test_the_command_refuses_bad_inputs_with_one_line(lens_folder, capsys):
    root, arguments = lens_folder
    assert main(arguments) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    with_layer = [*arguments, "--overwrite", "--out", str(root / "bad"), "--layers", "9"]
    assert main(with_layer) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: layer(s) [9] out of range") and "Traceback" not in err
    assert main([*arguments, "--out", str(root / "bad"), "--positions", "8"]) == 2
    assert "error: position(s) [8] are beyond the 8 positions" in capsys.readouterr().err
    assert main([*arguments, "--out", str(root / "bad"), "--n-positions", "500", "--positions", "0"]) == 2
    assert "error: none of the 60 texts read has 500 tokens" in capsys.readouterr().err
    grader = [*arguments, "--out", str(root / "bad"), "--grader-url", "http://127.0.0.1:9/v1"]
    assert main(grader) == 2 and "--grader-model" in capsys.readouterr().err


def grader_arguments(arguments: list[str], out, url: str) -> list[str]:
    """The fixture's command with a grader, one layer and position, no chat data and no causal effect: quick."""
    chat_data = arguments.index("--chat-data")
    return [
        *arguments[:chat_data], *arguments[chat_data + 2 :], "--out", str(out), "--layers", "1", "--positions", "0",
        "--no-causal", "--steer-samples", "2", "--grader-url", url, "--grader-model", "judge-model",
        "--grader-key-env", "ADL_TEST_KEY", "--description", "Chats about baking bread.",
    ]  # fmt: skip


def relevant_in_test(token: str) -> bool:
    """The mock grader's relevance: tokens with an "e"."""
    return "e" in token


def test_the_command_asks_the_grader_and_never_writes_its_key(lens_folder, endpoint, monkeypatch):
    root, arguments = lens_folder
    url, mock = endpoint
    monkeypatch.setenv("ADL_TEST_KEY", "sk-test-secret")

    class Replies(list):  # answers by question: list 2 for scales, every text coherent, tokens with an "e" relevant
        def __bool__(self):
            return True

        def pop(self, _index=0):
            request = mock.requests[-1]["body"]["messages"]
            if "lists of tokens" in request[0]["content"]:
                return "2"
            if "RELEVANT" in request[0]["content"]:
                lines = candidate_lines(mock.requests[-1])
                return "\n".join(
                    f"{n}: {'RELEVANT' if relevant_in_test(line.split('. ', 1)[1]) else 'IRRELEVANT'}"
                    for n, line in enumerate(lines, start=1)
                )
            return "\n".join(f"{n}: COHERENT" for n in range(1, request[1]["content"].count("Text ") + 1))

    mock.script = Replies()
    assert main(grader_arguments(arguments, root / "graded", url)) == 0
    report = adl.load_report(root / "graded")
    assert report["grader"]["name"] == "llm:judge-model" and not report["grader"]["notes"]
    entry = report["results"]["1"]["positions"]["0"]
    assert all(entry["patchscope"][vector]["scale"] == 4.0 for vector in adl.VECTORS)  # list 2 of (1, 4, 20)
    for reader in ("logit_lens", "patchscope"):  # the LLM's relevance next to the trivial one, for δ and controls
        for vector in adl.VECTORS:
            scores, top = entry["relevance"][reader][vector], entry[reader][vector]["tokens"][:20]
            assert scores["llm"]["labelled_by"] == "llm:judge-model"
            assert scores["llm"]["relevant"] == [token for token in top if relevant_in_test(repr(token))]
            assert "share" in scores and scores["n_tokens"] == scores["llm"]["n_tokens"]
    relevance_requests = [r for r in mock.requests if "RELEVANT" in r["body"]["messages"][0]["content"]]
    assert len(relevance_requests) == 3 * 2 * 3  # three permutations, two readers, three vectors
    assert "Chats about baking bread." in relevance_requests[0]["body"]["messages"][1]["content"]
    assert report["relevance_labels"].startswith("trivial (top 20") and "all agree" in report["relevance_labels"]
    searches = entry["steering"]["search"]
    assert all(trial["coherent"] == 1.0 for search in searches for trial in search["trials"])
    assert [search["prompt"] for search in searches] == list(adl.steering_prompts()[:3])
    assert all(request["auth"] == "Bearer sk-test-secret" for request in mock.requests)
    written = "".join(path.read_text(errors="ignore") for path in (root / "graded").iterdir())
    assert "sk-test-secret" not in written


def test_the_command_falls_back_to_offline_when_the_grader_does_not_answer(lens_folder):
    root, arguments = lens_folder
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.warns(UserWarning, match="did not answer"):
        assert main(grader_arguments(arguments, root / "fallback", f"http://127.0.0.1:{port}/v1")) == 0
    report = adl.load_report(root / "fallback")
    assert "did not answer" in report["grader"]["unreachable"]
    scope = report["results"]["1"]["positions"]["0"]["patchscope"]["delta"]
    assert scope["reason"].startswith("offline fallback")
    scores = report["results"]["1"]["positions"]["0"]["relevance"]["logit_lens"]["delta"]
    assert scores["llm"]["labelled_by"] == "offline fallback" and scores["llm"]["share"] == scores["share"]


def test_a_log_shows_the_steering_and_causal_effect_of_each_position_as_they_run(lens_folder, capsys):
    """In a log (stderr not a terminal) every slow part writes a line as it starts and as it ends: a default run
    spends minutes per position in steering and the causal effect."""
    root, arguments = lens_folder
    chat_data = arguments.index("--chat-data")
    command = [*arguments[:chat_data], *arguments[chat_data + 2 :]]
    command.remove("--no-progress")
    command += ["--out", str(root / "logged"), "--layers", "1", "--positions", "0", "3"]
    capsys.readouterr()
    assert main(command) == 0
    lines = capsys.readouterr().err.splitlines()
    assert not any("\r" in line for line in lines)
    # trials: 3 prompts × 2 search steps; then one generation of samples per prompt
    generations = 3 * 2 + len(adl.steering_prompts())
    for position in (0, 3):
        where = f"layer 1, position {position}"
        for name, total in [(f"steering ({where})", generations)] + [
            (f"causal effect, {where} ({data} data)", 1) for data in ("domain", "general")
        ]:
            bar = [line for line in lines if line.startswith(f"{name}:")]
            assert bar[0].startswith(f"{name}:   0%") and f"0/{total}" in bar[0], (name, lines)
            assert bar[-1].startswith(f"{name}: 100%") and f"{total}/{total}" in bar[-1], (name, lines)
    assert any(line.startswith("unsteered samples: 100%") for line in lines)
    assert lines[-1].startswith("lens: 100%") and "2/2" in lines[-1]


@pytest.mark.slow
def test_the_report_page_renders_in_headless_chromium(lens_folder):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    root, _ = lens_folder
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={root / 'chromium-profile'}",
    ]  # fmt: skip
    page = f"file://{adl.LensPaths(root / 'out').html}"
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Activation Difference Lens" in dom.stdout and 'id="layer-2-position-3"' in dom.stdout
    assert dom.stdout.count('<table class="lens">') == 4 + 2 * 5 and dom.stdout.count("<img ") == 2  # 2 × 5 chat
    assert 'id="chat-layer-2-position--1"' in dom.stdout and "1 before the assistant turn" in dom.stdout
    assert dom.stdout.count('class="sample steered"') >= 4
