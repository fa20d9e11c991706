"""Paired-activation stream throughput against the bare two-model forward on the same sequences.

Figures (tokens/s counts every non-padding input token):
- floor: both models' full forward (``model(input_ids, attention_mask)``) on the stream's sequences,
  micro-batched the same way;
- truncated: both models' forward stopped after layer L (what the stream runs), no data handling;
- stream: ``PairedActivationStream`` end to end (tokenize, forward to L, filter, shuffle, batch).
``ratio_to_floor`` = stream / floor (goal ≥ 0.9; above 1 because the stream stops at L);
``ratio_to_truncated`` = stream / truncated (the stream's own overhead); ``layer_stop_speedup`` = floor time /
truncated time. Models are randomly initialised Llamas (no download) of the given size, with the offline
model organism's tokenizer and text. Ends with one line of JSON.

    python bench/stream.py                      # CPU-sized
    python bench/stream.py --hidden 2048 --layers 16 --context 1024 --blocks 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

# isort: off
import crosscoder  # noqa: F401  (first, as in training: MKL's GEMM buffers from malloc, host_memory)
import datasets
import torch
from timing import synchronize, timed
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

# isort: on

from crosscoder.activations import PairedActivationStream, StreamSettings
from crosscoder.models import residual_outputs
from crosscoder.organism import build_model_organism


def random_llama(vocab_size: int, hidden: int, layers: int, context: int, seed: int, dtype, device) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=context,
    )
    return LlamaForCausalLM(config).to(device, dtype).eval()


def micro_batches(tokenizer, texts: list[str], context: int, model_batch_size: int, device):
    sequences = [tokenizer(text)["input_ids"][:context] for text in texts]
    sequences = [ids for ids in sequences if len(ids) >= 2]
    for first in range(0, len(sequences), model_batch_size):
        group = sequences[first : first + model_batch_size]
        length = max(map(len, group))
        ids = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids.to(device), mask.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--layer", type=int, default=None, help="L (default: the middle block)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--block-sequences", type=int, default=64)
    parser.add_argument("--model-batch-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    layer = args.layer if args.layer is not None else args.layers // 2

    organism = build_model_organism(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(organism.chat_path)
    texts = [row["text"] for row in datasets.load_dataset("json", data_files=str(organism.general_data), split="train")]
    n_sequences = args.block_sequences * args.blocks
    texts = (texts * (1 + n_sequences // len(texts)))[:n_sequences]
    base = random_llama(len(tokenizer), args.hidden, args.layers, args.context, 0, dtype, args.device)
    chat = random_llama(len(tokenizer), args.hidden, args.layers, args.context, 1, dtype, args.device)
    batches = list(micro_batches(tokenizer, texts, args.context, args.model_batch_size, args.device))
    n_tokens = sum(int(mask.sum()) for _, mask in batches)

    def floor() -> None:
        with torch.no_grad():
            for ids, mask in batches:
                base(input_ids=ids, attention_mask=mask, use_cache=False)
                chat(input_ids=ids, attention_mask=mask, use_cache=False)

    def truncated() -> None:
        for ids, mask in batches:
            residual_outputs(base, ids, mask, [layer])
            residual_outputs(chat, ids, mask, [layer])

    def stream() -> float:
        """Seconds until the last needed block arrived (not counting the prefetch thread's extra block)."""
        synchronize(args.device)
        start = time.perf_counter()
        settings = StreamSettings(
            layers=(layer,),
            context_length=args.context,
            block_sequences=args.block_sequences,
            model_batch_size=args.model_batch_size,
            outlier_norm_factor=100.0,
        )
        paired = PairedActivationStream(
            base,
            chat,
            tokenizer,
            [datasets.Dataset.from_list([{"text": t} for t in texts])],
            settings,
            batch_size=args.batch_size,
            base_tokenizer=tokenizer,
            prefetch_blocks=1,
        )
        for _ in paired.chunks():
            if paired.block_index == args.blocks:
                synchronize(args.device)
                seconds = time.perf_counter() - start
                break
        statistics = paired.statistics()
        processed = sum(statistics[name] for name in ("kept", "first_tokens", "token_ids", "outliers"))
        assert processed == n_tokens, (processed, n_tokens)
        return seconds

    floor()  # warm-up (allocations, kernels)
    results = {}
    for name, measure in (
        ("floor", lambda: timed(floor, args.device)),
        ("truncated", lambda: timed(truncated, args.device)),
        ("stream", stream),
    ):
        seconds = min(measure() for _ in range(2))
        results[name] = n_tokens / seconds
        print(f"{name:>9}: {results[name]:10.0f} tokens/s ({seconds:.2f} s for {n_tokens} tokens)")
    print(
        json.dumps(
            {
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                "hidden": args.hidden,
                "layers": args.layers,
                "layer": layer,
                "context": args.context,
                "dtype": args.dtype,
                "tokens": n_tokens,
                "floor_tokens_per_s": round(results["floor"]),
                "truncated_tokens_per_s": round(results["truncated"]),
                "stream_tokens_per_s": round(results["stream"]),
                "ratio_to_floor": round(results["stream"] / results["floor"], 3),
                "ratio_to_truncated": round(results["stream"] / results["truncated"], 3),
                "layer_stop_speedup": round(results["truncated"] / results["floor"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
