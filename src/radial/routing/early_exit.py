"""Confidence-threshold early exit over a model trained with nested exits (SoFT).

`ConfidenceExitRouter` is an example-level router: at every exit depth n it reads the hidden state
leaving layer n-1 through the model's own final norm and LM head and, once the top next-token
probability (max softmax) is at least `threshold`, skips every remaining layer for that example.
Threshold 0 stops every example at the first exit; a threshold above 1 never stops (dense).

The decision is made once per example, at prefill, on the last input position: the position
whose prediction comes next, so in generation it is CALM's confidence rule for the first new
token. The depth found there is then kept for the rest of the generation (the routed model fixes
a prefill's paths), so every later token has keys and values in exactly the layers it runs and
the KV cache of the skipped upper layers is never needed: nothing is copied up, and cached
generation equals uncached generation. The alternative, a per-token exit with the exited hidden
state copied up to fill the skipped layers' caches (CALM), needs those layers' key/value
projections for every token and saves little on a CPU. In one forward over a question and an
answer to score (lm-eval's loglikelihood requests) the evaluation passes the question's tokens as
the routed model's `decision_mask`, so the rule reads the question's last token, whose
prediction is the answer's first token: every answer choice of a question exits at one depth,
whatever the batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from radial.routing.routers import NUM_ACTIONS, Router, register_router
from radial.utils import RadialError

_DECIDED = 10.0  # logit margin that makes the chosen action win the argmax


@register_router
class ConfidenceExitRouter(Router):
    """Stop an example at the first exit whose LM-head confidence reaches `threshold` (no weights)."""

    def __init__(self, num_layers: int, exits: Sequence[int], threshold: float) -> None:
        super().__init__()
        exits = sorted({int(n) for n in exits})
        if not exits or not all(1 <= n < num_layers for n in exits):
            raise RadialError(f"early exits must lie in 1..{num_layers - 1} (an exit at {num_layers} is the full model), got {exits}")
        self.num_layers = num_layers
        self.exits = exits
        self.threshold = float(threshold)
        self._parts = None
        self._exited: torch.Tensor | None = None

    def init_kwargs(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "exits": self.exits, "threshold": self.threshold}

    def bind(self, parts) -> None:
        """Called by RoutedForCausalLM with its Backbone (final norm and LM head are read, never copied)."""
        self._parts = parts

    @torch.no_grad()
    def confidence(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Max softmax probability of the next-token prediction at each example's last real position."""
        if self._parts is None:
            raise RadialError("ConfidenceExitRouter is not attached to a model (use RoutedForCausalLM.set_router)")
        batch, seq = hidden_states.shape[:2]
        if attention_mask is None:
            last = torch.full((batch,), seq - 1, device=hidden_states.device)
        else:
            positions = torch.arange(seq, device=hidden_states.device)
            last = (attention_mask[:, -seq:].bool() * (positions + 1)).argmax(-1)
        hidden = hidden_states[torch.arange(batch, device=hidden_states.device), last]
        logits = self._parts.head(hidden).float()
        return logits.softmax(-1).amax(-1)

    def forward(self, layer_idx: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # The routed model asks about layers 0, 1, ..., L-1 in order within one forward.
        if layer_idx == 0 or self._exited is None or self._exited.shape[0] != hidden_states.shape[0]:
            self._exited = torch.zeros(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
        if layer_idx in self.exits and not self._exited.all():
            self._exited = self._exited | (self.confidence(hidden_states, attention_mask) >= self.threshold)
        logits = hidden_states.new_zeros(hidden_states.shape[0], NUM_ACTIONS, dtype=torch.float32)
        logits[:, 0] = torch.where(self._exited, _DECIDED, -_DECIDED)  # skip
        logits[:, 2] = -2 * _DECIDED  # never repeat
        return logits
