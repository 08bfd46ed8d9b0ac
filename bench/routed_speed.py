"""Dense vs routed throughput, measured in one run: does skipping layers really save wall-clock time?

    python bench/routed_speed.py [--repeats 5] [--threads 2]

For two random-weight Llama configs (the embedded model: 12 layers, hidden 128; and a wider one:
6 layers, hidden 768) we time the base Hugging Face model (dense) against RoutedForCausalLM on a
path that runs every other layer (half the depth), at batch 1 and batch 8:
- prefill: one forward over the prompt that fills the KV cache (logits for the last position only,
  as `generate` asks for);
- decode: greedy single-token steps with the cache (a plain loop, no `generate` overhead).
At batch 8 we also time "mixed": every example on its own half-depth path (four different ones),
which exercises the per-example gather/scatter scheduling.

Dense and routed runs alternate within each repeat and we report medians (or minima, --stat min). The realized speedup is
routed tokens/s over dense tokens/s; the ideal is L / average executed layers per example.

The last line is `key=value` figures: `realized_over_ideal` is the worst ratio over the settings
the target is about (one half-depth path for the batch), `mixed_realized_over_ideal` the worst
over the mixed batches. These two differ for a reason: a decoding step at small batch costs per
layer *call* (reading the weights, Python dispatch), not per row, so a mixed batch pays for the
union of its examples' layers; the `union` column shows that bound (L / layers run by anyone).

Timings on a shared CPU are noisy; with more torch threads than idle cores they get much worse.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from radial.routing import RoutedForCausalLM


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    prompt_len: int


MODELS = [
    ModelSpec("embedded", num_layers=12, hidden=128, heads=4, kv_heads=2, intermediate=384, prompt_len=128),
    ModelSpec("wide", num_layers=6, hidden=768, heads=12, kv_heads=4, intermediate=2048, prompt_len=64),
]
VOCAB = 2048


def build(spec: ModelSpec) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def half_paths(num_layers: int, batch: int, mixed: bool) -> list[list[int]]:
    """Every other layer; `mixed` rotates among four different half-depth paths per example."""
    variants = [
        list(range(0, num_layers, 2)),
        list(range(1, num_layers, 2)),
        list(range(num_layers // 2)),
        list(range(num_layers // 2, num_layers)),
    ]
    return [variants[row % len(variants) if mixed else 0] for row in range(batch)]


def time_prefill(model, ids: torch.Tensor, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1, **kwargs)
    return time.perf_counter() - start, out


def time_decode(model, out, steps: int, **kwargs) -> float:
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True, **kwargs)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.inference_mode()
def measure(dense, routed, ids, paths, new_tokens: int, repeats: int, stat) -> dict[str, tuple[float, float]]:
    """Seconds (dense, routed) for prefill and decode, summarized over repeats by `stat`."""
    samples = {"prefill": ([], []), "decode": ([], [])}
    for repeat in range(repeats + 1):  # the first round is warmup
        for which, (model, kwargs) in enumerate([(dense, {}), (routed, {"paths": paths})]):
            prefill_s, out = time_prefill(model, ids, **kwargs)
            decode_s = time_decode(model, out, new_tokens, **kwargs)
            if repeat > 0:
                samples["prefill"][which].append(prefill_s)
                samples["decode"][which].append(decode_s)
    return {phase: (stat(d), stat(r)) for phase, (d, r) in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per setting")
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="how repeats are summarized; min is the steadier estimate when other jobs share the CPU",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per repeat")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size")
    parser.add_argument(
        "--models", nargs="+", default=[m.name for m in MODELS], choices=[m.name for m in MODELS], help="configs to time"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    header = (
        f"{'model':9} {'batch':>5} {'paths':6} {'phase':8} {'dense tok/s':>12} {'routed tok/s':>13}"
        f" {'realized':>9} {'ideal':>6} {'ratio':>6} {'union':>6}"
    )
    print(header)
    print("-" * len(header))
    figures: dict[str, float] = {}
    ratios: dict[bool, list[float]] = {False: [], True: []}
    for spec in [m for m in MODELS if m.name in args.models]:
        dense = build(spec)
        routed = RoutedForCausalLM.from_base(build(spec))
        for batch, mixed in [(1, False), (args.batch, False), (args.batch, True)]:
            paths = half_paths(spec.num_layers, batch, mixed)
            ideal = spec.num_layers / (sum(map(len, paths)) / batch)
            union = spec.num_layers / len({layer for path in paths for layer in path})
            ids = torch.randint(3, VOCAB, (batch, spec.prompt_len), generator=torch.Generator().manual_seed(batch))
            stat = statistics.median if args.stat == "median" else min
            timings = measure(dense, routed, ids, paths, args.new_tokens, args.repeats, stat)
            for phase, (dense_s, routed_s) in timings.items():
                tokens = batch * (spec.prompt_len if phase == "prefill" else args.new_tokens)
                realized = dense_s / routed_s
                ratio = realized / ideal
                ratios[mixed].append(ratio)
                kind = "mixed" if mixed else "same"
                print(
                    f"{spec.name:9} {batch:5d} {kind:6} {phase:8} {tokens / dense_s:12.0f} {tokens / routed_s:13.0f}"
                    f" {realized:8.2f}x {ideal:5.2f}x {ratio:6.2f} {union:5.2f}x",
                    flush=True,
                )
                prefix = "" if spec.name == "embedded" else f"{spec.name}_"
                suffix = "_mixed" if mixed else ""
                figures[f"{prefix}{phase}_b{batch}{suffix}"] = round(ratio, 3)
    print(
        f"realized_over_ideal={min(ratios[False]):.3f} mixed_realized_over_ideal={min(ratios[True]):.3f} "
        + " ".join(f"{key}={value}" for key, value in figures.items())
        + f" threads={args.threads} repeats={args.repeats} stat={args.stat}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
