"""What token routing should save: matmul FLOPs of a dense forward against a token-routed one.

The ideal speedup of a token-routed model on some inputs is the FLOPs a dense forward over the
same real tokens needs, divided by the FLOPs its routing leaves: the q, k, v and o projections,
attention scores and values (each query against the keys it may see), the MLP, and the LM head over
the logits asked for. What a token that skips still pays depends on the granularity:

- skip "layer": its keys and values (later tokens attend to them), except at a reuse slot (a
  layer's second visit), where only the tokens that run it leave keys and values;
- skip "mlp" (DLO): the whole attention; only the MLP is saved.

Norms, rotary, the routers and the elementwise work are left out: they are what keeps a realized
speedup below this ideal. Padding is left out on both sides, so that the ideal measures what the
router skips and not the padding that sparse execution also drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder that the FLOP count needs."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # what one token's MLP computes: experts per token x expert width (+ a shared expert)
    vocab: int
    mlp_matrices: int = 3  # gated MLPs (gate, up, down); 2 for OPT's and GPT-NeoX's fc1 / fc2

    @classmethod
    def of(cls, config: Any) -> "Shape":
        """From a Hugging Face text config (Llama-style names; OPT's ffn_dim; MoE experts per token)."""
        heads = config.num_attention_heads
        intermediate = getattr(config, "intermediate_size", None) or config.ffn_dim
        experts_per_token = getattr(config, "num_experts_per_tok", None)
        if experts_per_token:
            expert = getattr(config, "moe_intermediate_size", None) or intermediate
            intermediate = experts_per_token * expert + (getattr(config, "shared_expert_intermediate_size", None) or 0)
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=intermediate,
            vocab=config.vocab_size,
            mlp_matrices=2 if config.model_type in ("opt", "gpt_neox") else 3,
        )


def layer_flops(shape: Shape, keys_seen: torch.Tensor, skip: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of one layer: (FLOPs only a running token pays, FLOPs every token pays).

    keys_seen[t] is how many keys token t attends to (its own included).
    """
    d, hd = shape.hidden, shape.head_dim
    kv_projections = torch.full_like(keys_seen, 2 * d * (2 * shape.kv_heads * hd), dtype=torch.float64)
    attention = 2 * d * shape.heads * hd * 2 + 2 * 2 * shape.heads * hd * keys_seen.double()  # q, o; scores, values
    mlp = torch.full_like(kv_projections, 2 * shape.mlp_matrices * d * shape.intermediate)
    if skip == "mlp":
        return mlp, kv_projections + attention
    return attention + mlp, kv_projections


def forward_flops(
    shape: Shape,
    runs: list[torch.Tensor],
    attention_mask: torch.Tensor | None,
    logit_rows: int,
    skip: str = "layer",
    reuse_slots: list[bool] | None = None,
) -> tuple[float, float]:
    """(dense, routed) FLOPs of one forward over [batch, seq] new tokens.

    runs: per executed layer, the [batch, seq] tokens that ran it (or its MLP); attention_mask:
    [batch, keys] over the cache and the new tokens (None: every token real, no cache);
    reuse_slots: per run, True at a reuse slot (only its runners pay keys and values; their
    attention is counted against every earlier key, an upper bound).
    """
    batch, seq = runs[0].shape if runs else (0, 0)
    if attention_mask is None:
        real = torch.ones(batch, seq, dtype=torch.bool)
        keys_seen = torch.arange(1, seq + 1).expand(batch, seq)
    else:
        mask = attention_mask.detach().cpu().to(torch.long)
        real = mask[:, -seq:].bool()
        keys_seen = mask.cumsum(1)[:, -seq:]
    running_cost, shared_cost = layer_flops(shape, keys_seen, skip)
    running_cost, shared_cost = running_cost * real, shared_cost * real
    lm_head = 2.0 * shape.hidden * shape.vocab * logit_rows
    dense = lm_head + shape.num_layers * float((running_cost + shared_cost).sum())
    routed = lm_head
    for index, run in enumerate(runs):
        run = run.detach().cpu()
        leaving_keys = run if reuse_slots and reuse_slots[index] else 1
        routed += float((run * running_cost).sum() + (leaving_keys * shared_cost).sum())
    return dense, routed


def ideal_speedup(shape: Shape, forwards: list[dict[str, Any]], skip: str = "layer") -> float | None:
    """Dense over routed FLOPs summed over recorded forwards (RoutedForCausalLM.recording_token_runs)."""
    dense = routed = 0.0
    for forward in forwards:
        d, r = forward_flops(
            shape, forward["runs"], forward["attention_mask"], forward["logit_rows"], skip, forward.get("reuse_slots")
        )
        dense, routed = dense + d, routed + r
    return dense / routed if routed > 0 else None


__all__ = ["Shape", "forward_flops", "ideal_speedup", "layer_flops"]
