"""What a causal LM's own forward does around its decoder layers, found on the loaded model.

Families differ only there; the decoder layers themselves are called as they are:
- Llama, Qwen2/3, Mistral, Mixtral, Qwen2-MoE: token embedding, one rotary table, final `norm`;
- Gemma 3: a scaled token embedding (the embedding module scales), a rotary table per attention
  type (`rotary_emb(x, position_ids, layer_type)`), final logit soft-capping;
- OPT: learned positions (`embed_positions`, positions counted over the attention mask), optional
  `project_in` / `project_out` around the layers, a `final_layer_norm` that may be absent;
- GPT-NeoX / Pythia: `embed_in`, embedding dropout, `final_layer_norm`, layers that take their
  cache as `layer_past`.

`RoutedForCausalLM`, the MCTS path evaluator, SoFT's exits and distillation reach the model through
a `Backbone`; `RoutedForCausalLM.check_equivalence` verifies, per wrapped model, that embed -> layers
-> `final` -> `logits` reproduces the model's own forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from radial.layers import find_decoder_layers
from radial.utils import RadialError

FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")
TOKEN_EMBEDDING_NAMES = ("embed_tokens", "embed_in", "wte")


@dataclass
class Backbone:
    """The stock modules around the decoder layers (references into the wrapped model, not copies)."""

    embed_tokens: nn.Module
    layers: list[nn.Module]
    lm_head: nn.Module
    norm: nn.Module | None = None
    rotary_emb: nn.Module | None = None
    rotary_per_layer_type: bool = False
    embed_positions: nn.Module | None = None
    project_in: nn.Module | None = None
    project_out: nn.Module | None = None
    embed_dropout: nn.Module | None = None
    logit_softcap: float | None = None
    cache_argument: str = "past_key_values"

    @classmethod
    def of(cls, model: PreTrainedModel) -> "Backbone":
        """The backbone of a loaded causal LM; a RadialError naming what is missing otherwise."""
        layers = find_decoder_layers(model)
        holder = next((m for m in model.modules() if getattr(m, "layers", None) is layers), model.base_model)
        embed_tokens = model.get_input_embeddings()
        lm_head = model.get_output_embeddings()
        missing = [name for name, part in (("a token embedding", embed_tokens), ("an LM head", lm_head)) if part is None]
        if missing:
            raise RadialError(f"cannot route {type(model).__name__}: it has no {' and no '.join(missing)}")
        rotary = getattr(holder, "rotary_emb", None)
        positions = getattr(holder, "embed_positions", None)
        if rotary is None and positions is None:
            raise RadialError(
                f"cannot route {type(model).__name__}: {type(holder).__name__} has neither a rotary embedding "
                "(rotary_emb) nor learned positions (embed_positions)"
            )
        norm = next((getattr(holder, n) for n in FINAL_NORM_NAMES if getattr(holder, n, None) is not None), None)
        layer_parameters = inspect.signature(layers[0].forward).parameters
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return cls(
            embed_tokens=embed_tokens,
            layers=list(layers),
            lm_head=lm_head,
            norm=norm,
            rotary_emb=rotary,
            rotary_per_layer_type=rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters,
            embed_positions=positions,
            project_in=getattr(holder, "project_in", None),
            project_out=getattr(holder, "project_out", None),
            embed_dropout=getattr(holder, "emb_dropout", None),
            logit_softcap=float(softcap) if softcap else None,
            cache_argument="layer_past" if "layer_past" in layer_parameters else "past_key_values",
        )

    # ------------------------------------------------------------------ before the layers
    def default_position_ids(
        self, attention_mask: torch.Tensor | None, past_seen: int, seq_len: int, device: torch.device
    ) -> torch.Tensor:
        """Positions when the caller gives none, as the family's forward counts them: learned positions
        count real tokens over the attention mask (OPT); rotary models count from the cache length."""
        if self.embed_positions is not None and attention_mask is not None and attention_mask.ndim == 2:
            counted = attention_mask.long().cumsum(1)
            return (counted * attention_mask.long() - 1)[:, past_seen:]
        return torch.arange(past_seen, past_seen + seq_len, device=device).unsqueeze(0)

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, position_ids: torch.Tensor):
        """The hidden states entering the first decoder layer."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(None, 0, position_ids=position_ids).to(hidden.device)
        if self.embed_dropout is not None:
            hidden = self.embed_dropout(hidden)
        return hidden

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_types: list[str]
    ) -> dict[str, Any]:
        """Rotary (cos, sin) per attention type in `layer_types`; None for each with learned positions."""
        kinds = set(layer_types)
        if self.rotary_emb is None:
            return dict.fromkeys(kinds)
        if self.rotary_per_layer_type:
            return {kind: self.rotary_emb(hidden, position_ids, kind) for kind in kinds}
        shared = self.rotary_emb(hidden, position_ids=position_ids)
        return dict.fromkeys(kinds, shared)

    # ------------------------------------------------------------------ the layers
    def call_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        *,
        mask: Any,
        position_ids: torch.Tensor,
        position_embeddings: Any,
        past_key_values: Any = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Call one stock decoder layer as the family's forward calls it; return its output hidden states.

        `past_key_values` is what the layer's attention writes its keys and values into (via
        `update(key, value, layer_idx)`), e.g. a `SlotView` of a `RoutedCache`.
        """
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        kwargs[self.cache_argument] = past_key_values
        out = layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=use_cache, **kwargs)
        if isinstance(out, tuple):  # older transformers returned (hidden, ...)
            out = out[0]
        return out

    # ------------------------------------------------------------------ after the layers
    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads: the final norm (if any), then project_out (if any)."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on `final` hidden states, soft-capped where the family caps (Gemma 3)."""
        logits = self.lm_head(final_hidden)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states leaving any decoder layer (early exits, MCTS paths)."""
        return self.logits(self.final(hidden))


__all__ = ["Backbone"]
