"""Cost of the MCTS labels with and without prefix sharing, measured in one run.

    python bench/mcts_cost.py                               # random-init 12-layer d=128 model
    python bench/mcts_cost.py --model results/embedded/models/dense  # a trained model (early stops often)

Both modes run the same search (Dr.LLM's default settings) on the same synthetic examples:
`naive` evaluates every simulation's path from scratch (a plain KV-cached greedy decode per path),
`cached` keeps hidden states and keys/values at path-prefix nodes (radial.path_eval), so a path
only computes the layers after its first difference from what was computed before. The labels
must be identical. Cost unit: a block evaluation = one decoder layer applied to one block of one
example's tokens (the prompt, or one decoding step); layer-tokens and wall time are printed too.

Without --model the bench builds the embedded default's shape (12 layers, d=128, 4 heads, 2 KV
heads, MLP 384) with random weights and a tokenizer trained on the synthetic text. Its answers
are never right, so every example runs all simulations (the full-search regime); a trained model
stops early on most examples, where fewer, shallower simulations share less. The MCTS stage's
stats.json gives the same ratio (`eval_reduction`) for the workflow's own model and examples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from radial import synthetic
from radial.stages.mcts import label_example
from radial.path_search import SearchSettings
from radial.routing import RoutedForCausalLM


def embedded_sized_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from radial.tokenizer import train_tokenizer

    texts = [synthetic.training_text(row) for row in synthetic.generate(2000, 5, seed, "train", test_rows=10)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


def run(routed, tokenizer, rows, settings, share_prefixes: bool) -> tuple[list[dict], dict]:
    start = time.perf_counter()
    labels = [
        label_example(routed, tokenizer, row, settings, seed=0, max_new_tokens=8, share_prefixes=share_prefixes)
        for row in rows
    ]
    cost = {
        "block_evaluations": sum(x["block_evaluations"] for x in labels),
        "layer_tokens": sum(x["layer_tokens"] for x in labels),
        "simulations": sum(x["simulations"] for x in labels),
        "seconds": time.perf_counter() - start,
    }
    return labels, cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a trained model folder (default: random init)")
    parser.add_argument("--examples", type=int, default=12, help="synthetic examples (balanced over 5 levels)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model is None:
        base, tokenizer = embedded_sized_model(seed=0)
        routed, source = RoutedForCausalLM.from_base(base).eval(), "random-init 12x128"
    else:
        from transformers import AutoTokenizer

        routed = RoutedForCausalLM.from_base(str(args.model), dtype=torch.float32).eval()
        tokenizer, source = AutoTokenizer.from_pretrained(args.model), str(args.model)
    rows = synthetic.generate(args.examples, 5, 1, "train", test_rows=10)
    settings = SearchSettings()

    results = {}
    for mode, share in (("naive", False), ("cached", True)):
        labels, cost = run(routed, tokenizer, rows, settings, share)
        results[mode] = (labels, cost)
        print(
            f"{mode:>6}: {cost['block_evaluations']:>7} block evaluations, {cost['layer_tokens']:>8} layer-tokens, "
            f"{cost['simulations']} simulations, "
            f"{cost['seconds']:.1f} s"
        )
    costs = ("block_evaluations", "naive_block_evaluations", "layer_tokens", "search_seconds")
    strip = lambda labels: [{k: v for k, v in x.items() if k not in costs} for x in labels]  # noqa: E731
    if strip(results["naive"][0]) != strip(results["cached"][0]):
        print("labels differ between naive and cached evaluation", file=sys.stderr)
        return 1
    naive, cached = results["naive"][1], results["cached"][1]
    # The workflow's stats.json reports the naive cost a prefix-shared search counts without running it.
    counted = sum(x["naive_block_evaluations"] for x in results["cached"][0])
    if counted != naive["block_evaluations"]:
        print(f"the cached run counted {counted} naive block evaluations, the naive run spent "
              f"{naive['block_evaluations']}", file=sys.stderr)
        return 1
    improved = sum(x["reward"] > 0 for x in results["cached"][0])
    print(f"model: {source}, {routed.num_layers} layers; {len(rows)} examples; "
          f"labels and counted naive cost identical; "
          f"{improved} with a correct path; settings: {settings}")
    print(
        f"eval_reduction={naive['block_evaluations'] / cached['block_evaluations']:.2f} "
        f"token_reduction={naive['layer_tokens'] / cached['layer_tokens']:.2f} "
        f"time_reduction={naive['seconds'] / cached['seconds']:.2f} "
        f"simulations={cached['simulations']} examples={len(rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
