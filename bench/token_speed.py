"""Token-level routing speed: does computing only the running tokens really save wall-clock time?

    python bench/token_speed.py [--repeats 7] [--threads N] [--stat median|min] [--skip layer|mlp]

For two random-weight Llama shapes (the embedded default read from config.yaml `model.embedded`,
and a wide one: 6 layers, hidden 768, as in bench/routed_speed.py) we time the base Hugging Face
model (dense) against RoutedForCausalLM in token mode (sparse execution, token_skip="layer") with
random per-token gates (fixed seed, a different draw per layer, example and position) that run
each (layer, token) with probability 0.5 or 0.75:
- prefill: one forward over a 128-token prompt that fills the KV cache (logits for the last
  position only, as `generate` asks for), at batch 1 and batch 8;
- decode: greedy single-token steps at batch 8 on top of that 128-token cache.

Dense and routed runs alternate within each repeat (the first repeat is a warm-up); we report
medians (or minima, --stat min). The realized speedup is dense time over routed time; the ideal
is dense FLOPs over routed FLOPs, counted from the gates actually drawn: matmuls of the q, k, v, o
projections, attention scores and values (each query against the keys it may see), the MLP and
the LM head, where a skipped token still pays its k and v projections. With `--skip mlp` (DLO's
default granularity) every token runs the attention and the gates pick who runs the MLP: the ideal
then counts only the MLP as saved.

The last line is `key=value` figures: `token_realized_over_ideal` is the worst realized/ideal over
the wide prefill cells (the target is >= 0.8); then every cell's ratio. What bounds the ratios:
- a projection over half the rows does not take half the time (here a 768x2048 one costs ~16% more
  per row at 61 rows than at 128), so the wide batch-1 prefill at 0.5 stays near 0.85 even for a
  plain dense forward over the same number of tokens;
- decoding at batch 8 reads every weight matrix once per step whichever rows use it (wide), or is
  dominated by per-operation overhead (embedded: 128-wide matrices), so its time barely follows
  the FLOPs and gathering the running rows does not pay back.

Timings on a shared CPU are noisy; with more torch threads than idle cores they get much worse.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from radial.routing import RoutedForCausalLM, TokenRouter, flops
from radial.routing.flops import Shape

CONFIG_YAML = Path(__file__).resolve().parents[1] / "config.yaml"
VOCAB = 2048
PROMPT_LEN = 128
FRACTIONS = (0.5, 0.75)
CELLS = [("prefill", 1), ("prefill", 8), ("decode", 8)]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = VOCAB


def model_specs() -> list[ModelSpec]:
    embedded = yaml.safe_load(CONFIG_YAML.read_text())["model"]["embedded"]
    return [
        ModelSpec(
            "embedded",
            num_layers=embedded["layers"],
            hidden=embedded["hidden_size"],
            heads=embedded["heads"],
            kv_heads=embedded["kv_heads"],
            intermediate=embedded["intermediate_size"],
            vocab=embedded["vocab_size"],
        ),
        ModelSpec("wide", num_layers=6, hidden=768, heads=12, kv_heads=4, intermediate=2048),
    ]


def build_config(spec: ModelSpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def build(spec: ModelSpec) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(build_config(spec)).eval()


class SeededGates(TokenRouter):
    """Runs (layer, example, position) iff a fixed random draw is below `fraction`.

    Unlike radial's RandomTokenRouter the draw also depends on the example, so the rows of a batch
    run different numbers of tokens (as a trained router's would) and the packed queries need padding.
    """

    def __init__(self, num_layers: int, batch: int, fraction: float, seed: int = 0, max_positions: int = 512):
        super().__init__()
        self.num_layers = num_layers
        self.fraction = fraction
        self.draws = torch.rand(num_layers, batch, max_positions, generator=torch.Generator().manual_seed(seed))

    def runs(self, layer: int, positions: slice) -> torch.Tensor:
        return self.draws[layer, :, positions] < self.fraction

    def forward(self, layer_idx, hidden_states, attention_mask):
        end = attention_mask.shape[1]
        return self.runs(layer_idx, slice(end - hidden_states.shape[1], end)).float() - 0.5


def ideal_speedup(
    spec: ModelSpec, gates: SeededGates, phase: str, batch: int, decode_steps: int, skip: str = "layer"
) -> float:
    """Dense FLOPs over routed FLOPs for the tokens this cell computes, with the gates as drawn."""
    shape = Shape.of(build_config(spec))
    if phase == "prefill":  # one forward, logits for the last position only
        runs = [gates.runs(layer, slice(0, PROMPT_LEN))[:batch] for layer in range(spec.num_layers)]
        forwards = [{"runs": runs, "attention_mask": None, "logit_rows": batch}]
    else:  # one forward per new token, on top of the cache
        forwards = [
            {
                "runs": [gates.runs(layer, slice(p, p + 1))[:batch] for layer in range(spec.num_layers)],
                "attention_mask": torch.ones(batch, p + 1, dtype=torch.long),
                "logit_rows": batch,
            }
            for p in range(PROMPT_LEN, PROMPT_LEN + decode_steps)
        ]
    return flops.ideal_speedup(shape, forwards, skip)


def time_prefill(model, ids: torch.Tensor) -> tuple[float, object]:
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, out


def time_decode(model, out, prompt_len: int, steps: int) -> float:
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    batch = token.shape[0]
    start = time.perf_counter()
    for step in range(steps):
        mask = torch.ones(batch, prompt_len + step + 1, dtype=torch.long)
        out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.inference_mode()
def measure(models: dict, batch: int, phases: list[str], decode_steps: int, repeats: int, stat) -> dict:
    """Seconds per (phase, model name), summarized over repeats; models alternate within each repeat."""
    ids = torch.randint(3, VOCAB, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    samples = {(phase, name): [] for phase in phases for name in models}
    for repeat in range(repeats + 1):  # the first round is warm-up
        for name, model in models.items():
            prefill_s, out = time_prefill(model, ids)
            timings = {"prefill": prefill_s}
            if "decode" in phases:
                timings["decode"] = time_decode(model, out, PROMPT_LEN, decode_steps)
            if repeat > 0:
                for phase in phases:
                    samples[(phase, name)].append(timings[phase])
    return {key: stat(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per cell")
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="how repeats are summarized; min is the steadier estimate when other jobs share the CPU",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per repeat")
    parser.add_argument(
        "--skip", choices=["layer", "mlp"], default="layer", help="what a gate skips: the layer, or its MLP only (DLO)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stat = statistics.median if args.stat == "median" else min

    header = (
        f"{'model':9} {'phase':8} {'batch':>5} {'run':>5} {'dense ms':>9} {'sparse ms':>10}"
        f" {'realized':>9} {'ideal':>6} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    figures: dict[str, float] = {}
    for spec in model_specs():
        base = build(spec)
        for batch in sorted({b for _, b in CELLS}):
            phases = [phase for phase, b in CELLS if b == batch]
            gates = {f: SeededGates(spec.num_layers, batch, f, seed=batch) for f in FRACTIONS}
            models = {"dense": base}
            for fraction, router in gates.items():
                routed = RoutedForCausalLM.from_base(base, router=router, token_skip=args.skip)
                if routed.token_execution != "sparse":
                    raise SystemExit(f"token routing is not sparse here: {routed.token_execution}")
                models[fraction] = routed
            seconds = measure(models, batch, phases, args.decode_steps, args.repeats, stat)
            for phase in phases:
                for fraction in FRACTIONS:
                    dense_s, sparse_s = seconds[(phase, "dense")], seconds[(phase, fraction)]
                    realized = dense_s / sparse_s
                    ideal = ideal_speedup(spec, gates[fraction], phase, batch, args.decode_steps, args.skip)
                    ratio = realized / ideal
                    print(
                        f"{spec.name:9} {phase:8} {batch:5d} {fraction:5.2f} {dense_s * 1e3:9.1f}"
                        f" {sparse_s * 1e3:10.1f} {realized:8.2f}x {ideal:5.2f}x {ratio:6.2f}",
                        flush=True,
                    )
                    figures[f"{spec.name}_{phase}_b{batch}_f{fraction}"] = round(ratio, 3)
    worst_wide_prefill = min(value for key, value in figures.items() if key.startswith("wide_prefill"))
    print(
        f"token_realized_over_ideal={worst_wide_prefill:.3f} "
        + " ".join(f"{key}={value}" for key, value in figures.items())
        + f" threads={args.threads} repeats={args.repeats} stat={args.stat} decode_steps={args.decode_steps}"
        + f" skip={args.skip}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
