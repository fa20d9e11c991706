"""Downstream KL equals a hand-written patch on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tokenizer, chat_rows, finetuned_copy, llama

import crosscoder
from crosscoder.eval.kl import (
    assistant_token_mask,
    crosscoder_patch,
    diff_sae_patch,
    downstream_kl,
    latent_subset_patch,
    sae_latent_subset_patch,
)
from crosscoder.eval.workspace import kl_effects, removal_patches

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    base = llama(len(tokenizer))
    chat = finetuned_copy(base, scale=0.2)
    conversations = [row["messages"] for row in chat_rows(5)]
    return tokenizer, base, chat, conversations


def hand_written_kl(tokenizer, base, chat, messages, patch_fn, first_tokens):
    """KL(P_chat ‖ P_patched) for one conversation, computed without the library's machinery."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    input_ids = torch.tensor([ids])
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    start = ids.index(assistant) + 1  # first assistant token
    end = len(ids)  # the assistant message runs to the end, its <|end|> included
    with torch.no_grad():
        h_base = base(input_ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        h_chat = chat(input_ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        patched = patch_fn(h_base, h_chat)
        handle = chat.model.layers[LAYER].register_forward_hook(lambda m, i, o: patched[None])
        patched_logprobs = F.log_softmax(chat(input_ids).logits[0], -1)
        handle.remove()
        chat_logprobs = F.log_softmax(chat(input_ids).logits[0], -1)
    kl = (chat_logprobs.exp() * (chat_logprobs - patched_logprobs)).sum(-1)
    predicting = torch.arange(start - 1, end - 1)  # positions whose next token is an assistant token
    first, rest = predicting[:first_tokens], predicting[first_tokens:]
    return kl[first], kl[rest]


def test_assistant_mask_covers_the_assistant_message_only(setup):
    tokenizer = setup[0]
    messages = setup[3][0]
    ids, positions = assistant_token_mask(tokenizer, messages)
    assistant = ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>"))
    assert positions[: assistant + 1] == [-1] * (assistant + 1)
    assert positions[assistant + 1 :] == list(range(len(ids) - assistant - 1))


def test_kl_of_each_patch_equals_the_hand_written_computation(setup):
    tokenizer, base, chat, conversations = setup
    torch.manual_seed(0)
    sae = crosscoder.BatchTopKSAE(d_model=32, dict_size=64, k=4)
    reverse = crosscoder.BatchTopKSAE(d_model=32, dict_size=64, k=4, input="base_minus_chat")
    cc = crosscoder.BatchTopKCrossCoder(d_model=32, dict_size=64, k=4)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
        reverse.threshold.fill_(0.05)
        sae.input_scale.fill_(2.0)
        cc.threshold.fill_(0.1)
    patches = {
        "diff_sae": diff_sae_patch(sae),
        "reverse_sae": diff_sae_patch(reverse),
        "sae_subset": sae_latent_subset_patch(sae, [2, 7, 9]),
        "crosscoder": crosscoder_patch(cc),
        "subset": latent_subset_patch(cc, [1, 5]),
    }
    result = downstream_kl(base, chat, tokenizer, conversations, LAYER, patches, first_tokens=3, batch_size=2)

    hand_patches = {
        "base": lambda h_base, h_chat: h_base,
        "diff_sae": lambda h_base, h_chat: h_base + sae(h_chat - h_base),
        "reverse_sae": lambda h_base, h_chat: h_base - reverse(h_base - h_chat),  # estimates h_chat, not h_base
        "sae_subset": lambda h_base, h_chat: (
            h_base + sae.encode(h_chat - h_base)[:, [2, 7, 9]] @ (sae.W_dec[[2, 7, 9], 0] / 2.0)
        ),
        "crosscoder": lambda h_base, h_chat: (
            h_base + (lambda r: r[:, 1] - r[:, 0])(cc(torch.stack([h_base, h_chat], 1)))
        ),
        "subset": lambda h_base, h_chat: (
            h_base
            + cc.encode(torch.stack([h_base, h_chat], 1))[:, [1, 5]] @ (cc.W_dec[[1, 5], 1] - cc.W_dec[[1, 5], 0])
        ),
    }
    for name, patch_fn in hand_patches.items():
        pieces = [hand_written_kl(tokenizer, base, chat, m, patch_fn, 3) for m in conversations]
        first = torch.cat([p[0] for p in pieces])
        rest = torch.cat([p[1] for p in pieces])
        assert result.first_tokens[name] == pytest.approx(first.mean().item(), rel=1e-4, abs=1e-7)
        assert result.rest[name] == pytest.approx(rest.mean().item(), rel=1e-4, abs=1e-7)
        assert result.n_first == len(first) and result.n_rest == len(rest)
    gap = result.all_tokens["base"]
    assert gap > 0
    assert result.gap_closed["diff_sae"] == pytest.approx(1 - result.all_tokens["diff_sae"] / gap)


def test_a_perfect_patch_closes_the_whole_gap(setup):
    tokenizer, base, chat, conversations = setup
    result = downstream_kl(base, chat, tokenizer, conversations, LAYER, {"chat": lambda h_base, h_chat: h_chat})
    assert result.all_tokens["chat"] == pytest.approx(0.0, abs=1e-6)
    assert result.gap_closed["chat"] == pytest.approx(1.0, abs=1e-5)


def test_conversations_without_assistant_turns_are_refused(setup):
    tokenizer, base, chat, _ = setup
    with pytest.raises(ValueError, match="no conversation has an assistant message"):
        downstream_kl(base, chat, tokenizer, [[{"role": "user", "content": "hi"}]], LAYER, {})


def test_removing_a_latent_from_the_patch_equals_decoding_without_it(setup):
    """The latent workspace's KL effect (docs/methods.md §11.3): the "without j" patch equals the full patch decoded
    from codes with latent j zeroed, and its effect is the KL of that brute-force patch minus the full patch's."""
    tokenizer, base, chat, conversations = setup
    torch.manual_seed(1)
    cc = crosscoder.BatchTopKCrossCoder(d_model=32, dict_size=64, k=4)
    sae = crosscoder.BatchTopKSAE(d_model=32, dict_size=64, k=4)
    with torch.no_grad():
        cc.threshold.fill_(0.1)
        cc.input_scale.copy_(torch.tensor([1.5, 0.5]))
        sae.threshold.fill_(0.05)
        sae.input_scale.fill_(2.0)

    def cc_without(latent):
        def patch(h_base, h_chat):
            codes = cc.encode(torch.stack([h_base, h_chat], 1))
            codes[:, latent] = 0
            x_hat = cc.decode(codes)
            return h_base + x_hat[:, 1] - x_hat[:, 0]

        return patch

    def sae_without(latent):
        def patch(h_base, h_chat):
            codes = sae.encode(h_chat - h_base)
            codes[:, latent] = 0
            return h_base + sae.decode(codes)

        return patch

    h_base, h_chat = torch.randn(40, 32), torch.randn(40, 32)
    for dictionary, brute_force in ((cc, cc_without), (sae, sae_without)):
        codes = dictionary.encode(dictionary.input_from_pair(torch.stack([h_base, h_chat], 1)))
        latents = codes.count_nonzero(0).argsort(descending=True)[:3].tolist()  # latents that fire here
        assert codes[:, latents[-1]].count_nonzero() > 0
        patches = removal_patches(dictionary, latents)
        for latent in latents:
            torch.testing.assert_close(
                patches[f"without {latent}"](h_base, h_chat), brute_force(latent)(h_base, h_chat), atol=1e-5, rtol=1e-5
            )
        effects = kl_effects(base, chat, tokenizer, conversations, LAYER, dictionary, latents[:2], first_tokens=3)
        reference = downstream_kl(
            base,
            chat,
            tokenizer,
            conversations,
            LAYER,
            {"full": patches["full"], **{latent: brute_force(latent) for latent in latents[:2]}},
            first_tokens=3,
        ).all_tokens
        for latent in latents[:2]:
            expected = reference[latent] - reference["full"]
            assert effects[latent]["kl_effect"] == pytest.approx(expected, rel=1e-3, abs=1e-5)  # a difference of KLs
            assert effects[latent]["gap_share"] == pytest.approx(expected / reference["base"], rel=1e-3, abs=1e-5)
            assert abs(expected) > 0  # removing a latent that fires changes the patched model
