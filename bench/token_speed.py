"""Token-level routing speed: does computing only the running tokens really save wall-clock time?

    python bench/token_speed.py [--repeats 7] [--threads N] [--stat median|min] [--skip layer|mlp]
                                [--device cpu|cuda] [--dtype float32|bfloat16] [--models embedded,wide]

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
the prefill cells of the shapes other than the embedded one (the target is >= 0.8); then every
cell's ratio. What bounds the ratios:
- a projection over half the rows does not take half the time (here a 768x2048 one costs ~16% more
  per row at 61 rows than at 128), so the wide batch-1 prefill at 0.5 stays near 0.85 even for a
  plain dense forward over the same number of tokens;
- decoding at batch 8 reads every weight matrix once per step whichever rows use it (wide), or is
  dominated by per-operation overhead (embedded: 128-wide matrices), so its time barely follows
  the FLOPs and gathering the running rows does not pay back.

Before timing, each routed model's prefill logits are compared with the reference path's (every
token computed, then selected) on the same gates: the `max|diff|` column, relative to the logits'
largest magnitude. On a GPU (`--device cuda`, clocks read after a synchronize) `--models` can add
`llama-3.2-3b` (its shape, random weights, 28 layers, hidden 3072), where the matrices are large
enough for the GPU's time to follow the FLOPs rather than kernel launches.

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
        ModelSpec("llama-3.2-3b", num_layers=28, hidden=3072, heads=24, kv_heads=8, intermediate=8192, vocab=128256),
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


def build(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: a 3B model's init on CPU takes minutes
        return LlamaForCausalLM(build_config(spec)).to(dtype).eval()


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
        runs = self.runs(layer_idx, slice(end - hidden_states.shape[1], end))
        return runs.to(hidden_states.device, hidden_states.dtype) - 0.5


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


def clock(device: torch.device) -> float:
    """Seconds, once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_prefill(model, ids: torch.Tensor) -> tuple[float, object]:
    mask = torch.ones_like(ids)
    start = clock(ids.device)
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return clock(ids.device) - start, out


def time_decode(model, out, prompt_len: int, steps: int) -> float:
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    batch, device = token.shape[0], token.device
    start = clock(device)
    for step in range(steps):
        mask = torch.ones(batch, prompt_len + step + 1, dtype=torch.long, device=device)
        out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    return clock(device) - start


@torch.inference_mode()
def sparse_error(routed: RoutedForCausalLM, ids: torch.Tensor) -> float:
    """Largest |sparse - reference| over the prompt's logits, relative to the reference's largest |logit|."""
    mask = torch.ones_like(ids)
    sparse = routed(ids, attention_mask=mask).logits.float()
    with routed.token_execution_mode("reference"):
        reference = routed(ids, attention_mask=mask).logits.float()
    return float((sparse - reference).abs().max() / reference.abs().max())


@torch.inference_mode()
def measure(models: dict, ids: torch.Tensor, phases: list[str], decode_steps: int, repeats: int, stat) -> dict:
    """Seconds per (phase, model name), summarized over repeats; models alternate within each repeat."""
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
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--models", default="embedded,wide", help="comma-separated, of: embedded, wide, llama-3.2-3b (GPU-sized)"
    )
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    specs = {spec.name: spec for spec in model_specs()}
    names = args.models.split(",")
    unknown = [name for name in names if name not in specs]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(specs)})")
    torch.set_num_threads(args.threads)
    stat = statistics.median if args.stat == "median" else min

    header = (
        f"{'model':12} {'phase':8} {'batch':>5} {'run':>5} {'dense ms':>9} {'sparse ms':>10}"
        f" {'realized':>9} {'ideal':>6} {'ratio':>6} {'max|diff|':>9}"
    )
    print(header)
    print("-" * len(header))
    figures: dict[str, float] = {}
    errors: dict[str, float] = {}
    for spec in (specs[name] for name in names):
        base = build(spec, device, dtype)
        for batch in sorted({b for _, b in CELLS}):
            phases = [phase for phase, b in CELLS if b == batch]
            gates = {f: SeededGates(spec.num_layers, batch, f, seed=batch) for f in FRACTIONS}
            models = {"dense": base}
            for fraction, router in gates.items():
                routed = RoutedForCausalLM.from_base(base, router=router, token_skip=args.skip)
                if routed.token_execution != "sparse":
                    raise SystemExit(f"token routing is not sparse here: {routed.token_execution}")
                models[fraction] = routed
            ids = torch.randint(3, spec.vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
            ids = ids.to(device)
            error = {fraction: sparse_error(models[fraction], ids) for fraction in FRACTIONS}
            seconds = measure(models, ids, phases, args.decode_steps, args.repeats, stat)
            for phase in phases:
                for fraction in FRACTIONS:
                    dense_s, sparse_s = seconds[(phase, "dense")], seconds[(phase, fraction)]
                    realized = dense_s / sparse_s
                    ideal = ideal_speedup(spec, gates[fraction], phase, batch, args.decode_steps, args.skip)
                    ratio = realized / ideal
                    print(
                        f"{spec.name:12} {phase:8} {batch:5d} {fraction:5.2f} {dense_s * 1e3:9.1f}"
                        f" {sparse_s * 1e3:10.1f} {realized:8.2f}x {ideal:5.2f}x {ratio:6.2f}"
                        f" {error[fraction]:9.1e}",
                        flush=True,
                    )
                    figures[f"{spec.name}_{phase}_b{batch}_f{fraction}"] = round(ratio, 3)
            errors |= {f"{spec.name}_b{batch}_f{fraction}": value for fraction, value in error.items()}
        del base, models
    # The headline: prefill on the shapes wider than the embedded one (where the FLOPs can show).
    wider_prefill = [value for key, value in figures.items() if "_prefill_" in key and not key.startswith("embedded")]
    worst_wider_prefill = min(wider_prefill) if wider_prefill else float("nan")
    print(
        f"token_realized_over_ideal={worst_wider_prefill:.3f} "
        + " ".join(f"{key}={value}" for key, value in figures.items())
        + f" threads={args.threads} repeats={args.repeats} stat={args.stat} decode_steps={args.decode_steps}"
        + f" skip={args.skip} device={args.device} dtype={args.dtype}"
        + f" worst_relative_logit_error={max(errors.values()):.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
