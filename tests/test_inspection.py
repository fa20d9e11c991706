"""Top-activating contexts with bounded memory."""

import pytest
import torch

from crosscoder.eval.inspection import PAD, TopContexts


def brute_force_top(codes: torch.Tensor, n_top: int) -> list[list[int]]:
    return [codes[:, column].topk(n_top).indices.tolist() for column in range(codes.shape[1])]


def test_streamed_top_contexts_equal_the_top_over_all_tokens():
    generator = torch.Generator().manual_seed(0)
    codes = torch.rand(300, 3, generator=generator) * (torch.rand(300, 3, generator=generator) < 0.3)
    token_ids = torch.arange(300) + 1000
    sequence_ids = torch.arange(300) // 25  # sequences of 25 tokens
    contexts = TopContexts([5, 6, 7], n_top=4, before=3, after=2)
    for start in range(0, 300, 70):  # chunks of 70 tokens (sequence ids restart per chunk in a real stream)
        contexts.update(codes[start : start + 70], token_ids[start : start + 70], sequence_ids[start : start + 70])
    examples = contexts.examples()
    for column, latent in enumerate([5, 6, 7]):
        top = brute_force_top(codes, 4)[column]
        assert [example.token_ids[3] - 1000 for example in examples[latent]] == top
        for example, position in zip(examples[latent], top, strict=True):
            assert example.activation == pytest.approx(codes[position, column].item())
            chunk_start = position // 70 * 70
            for offset, (token, activation) in enumerate(zip(example.token_ids, example.activations, strict=True)):
                neighbour = position + offset - 3
                same_sequence = neighbour // 25 == position // 25
                in_chunk = chunk_start <= neighbour < min(chunk_start + 70, 300)
                if same_sequence and in_chunk:
                    assert token == 1000 + neighbour
                    assert activation == pytest.approx(codes[neighbour, column].item())
                else:
                    assert token == PAD and activation == 0.0


def test_latents_that_never_fire_have_no_examples():
    contexts = TopContexts([0, 1], n_top=3)
    contexts.update(torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([7, 8]))
    examples = contexts.examples()
    assert examples[0] == [] and [e.activation for e in examples[1]] == [2.0, 1.0]


def test_empty_latent_set_is_refused():
    with pytest.raises(ValueError, match="latent set is empty"):
        TopContexts([])
