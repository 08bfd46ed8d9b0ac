"""Routers: who decides which layers an example (or a token) runs.

Example-level (Dr.LLM). A `Router` is asked once per layer during prefill: at layer i it sees the
hidden states entering layer i (the result of that example's path so far) and returns logits over
the three actions 0 skip, 1 execute, 2 repeat once, per example. The routed model turns them into
actions (argmax, after the `RouterBudget` knob) and runs the layer accordingly, so the path is
built layer by layer while prefill executes. The decided path is then fixed while decoding.

Token-level (FlexiDepth / mixture-of-depths style, for the distillation stage). A `TokenRouter`
returns, per layer, one logit per token: > 0 runs the layer for that token, <= 0 lets the token's
hidden state pass through unchanged. Skipped tokens still get keys and values at that layer,
computed by the layer's attention projections from the hidden state the token carries into the
layer (FlexiDepth's choice); later tokens attend to them as usual and the cache keeps one entry per
token per layer, so cached decoding equals uncached decoding. At inference the routed model
computes the rest of the layer for the running tokens only (radial.routing.sparse); the reference
implementation, which runs the layer on every token and selects, remains for training and tests.

Router classes register by name (`register_router`) so saved routers rebuild from their config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from radial.utils import RadialError

NUM_ACTIONS = 3
ROUTER_CLASSES: dict[str, type[nn.Module]] = {}


def register_router(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make a router class rebuildable from a saved routing config."""
    ROUTER_CLASSES[cls.__name__] = cls
    return cls


def router_spec(router: nn.Module) -> dict[str, Any]:
    """What the routing config stores to rebuild `router`: its class name and constructor kwargs."""
    name = type(router).__name__
    if ROUTER_CLASSES.get(name) is not type(router):
        raise RadialError(f"router class {name} is not registered; decorate it with @register_router")
    return {"class": name, "kwargs": router.init_kwargs()}


def build_router(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a router from `router_spec` output (weights are loaded separately)."""
    name = spec.get("class")
    if name not in ROUTER_CLASSES:
        known = ", ".join(sorted(ROUTER_CLASSES)) or "none"
        raise RadialError(f"unknown router class {name!r} in routing config (registered: {known})")
    return ROUTER_CLASSES[name](**spec.get("kwargs", {}))


class Router(nn.Module):
    """Example-level router. Subclasses implement `forward` and `init_kwargs`."""

    num_layers: int

    def forward(
        self, layer_idx: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Action logits [batch, 3] for layer `layer_idx`.

        hidden_states: [batch, seq, hidden], entering layer `layer_idx`.
        attention_mask: [batch, seq] with 1 on real tokens, or None when every token is real.
        """
        raise NotImplementedError

    def init_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError


class TokenRouter(nn.Module):
    """Token-level router. `forward` returns execute logits [batch, seq] (> 0 runs the layer)."""

    num_layers: int

    def forward(
        self, layer_idx: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def init_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class RouterBudget:
    """The inference-time knob that trades accuracy for depth.

    skip_bias is added to the skip logit and repeat_bias to the repeat logit before the argmax:
    a positive skip_bias (or negative repeat_bias) runs fewer layers. max_layers caps the layers
    an example executes: once a decision would exceed it, a repeat becomes an execute and an
    execute becomes a skip (so later layers are skipped first).
    """

    skip_bias: float = 0.0
    repeat_bias: float = 0.0
    max_layers: int | None = None

    def actions(self, logits: torch.Tensor, executed_so_far: torch.Tensor) -> torch.Tensor:
        """Per-example action (0, 1, 2) from router logits [batch, 3] and layers run so far [batch]."""
        if logits.ndim != 2 or logits.shape[-1] != NUM_ACTIONS:
            raise RadialError(f"a router must return logits of shape [batch, 3], got {tuple(logits.shape)}")
        bias = logits.new_tensor([self.skip_bias, 0.0, self.repeat_bias])
        actions = (logits + bias).argmax(dim=-1)
        if self.max_layers is not None:
            room = (self.max_layers - executed_so_far).clamp(min=0)
            actions = torch.minimum(actions, room.to(actions.dtype))
        return actions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windowed_mean_pool(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, num_windows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each example's real tokens into `num_windows` contiguous windows and average each.

    Returns pooled [batch, windows, hidden] and a [batch, windows] mask of non-empty windows
    (an example shorter than `num_windows` tokens has empty windows).
    """
    batch, seq, _ = hidden_states.shape
    valid = (
        torch.ones(batch, seq, dtype=torch.bool, device=hidden_states.device)
        if attention_mask is None
        else attention_mask[:, -seq:].to(torch.bool)
    )
    rank = valid.long().cumsum(-1) - 1  # position among the real tokens
    length = valid.sum(-1, keepdim=True).clamp(min=1)
    window = torch.div(rank * num_windows, length, rounding_mode="floor").clamp(0, num_windows - 1)
    member = nn.functional.one_hot(window, num_windows).to(hidden_states.dtype) * valid.unsqueeze(-1)
    count = member.sum(1)  # [batch, windows]
    pooled = torch.einsum("btw,btd->bwd", member, hidden_states) / count.clamp(min=1).unsqueeze(-1)
    return pooled, count > 0


@register_router
class DrLLMRouter(Router):
    """Dr.LLM's router: per layer Linear(d, 128) -> GELU -> Linear(128, 3) on windowed means.

    The hidden states entering the layer are mean-pooled over `num_windows` contiguous windows
    of the real tokens; the MLP scores each window and the logits are averaged over windows.
    """

    def __init__(self, num_layers: int, hidden_size: int, bottleneck: int = 128, num_windows: int = 8) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.bottleneck = bottleneck
        self.num_windows = num_windows
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_size, bottleneck), nn.GELU(), nn.Linear(bottleneck, NUM_ACTIONS))
            for _ in range(num_layers)
        )

    def init_kwargs(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "bottleneck": self.bottleneck,
            "num_windows": self.num_windows,
        }

    def forward(
        self, layer_idx: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = self.layers[layer_idx][0].weight.dtype
        pooled, nonempty = windowed_mean_pool(hidden_states.to(dtype), attention_mask, self.num_windows)
        return self.pooled_logits(layer_idx, pooled, nonempty)

    def pooled_logits(self, layer_idx: int, pooled: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Action logits [batch, 3] from `windowed_mean_pool` output (training reuses pooled states)."""
        mlp = self.layers[layer_idx]
        dtype = mlp[0].weight.dtype
        window_logits = mlp(pooled.to(dtype))  # [batch, windows, 3]
        weight = nonempty.to(dtype).unsqueeze(-1)
        return (window_logits * weight).sum(1) / weight.sum(1).clamp(min=1)


@register_router
class GateTokenRouter(TokenRouter):
    """Reference token router: per layer a linear gate on the token's hidden state.

    Initialised to run every token through every layer (zero weights, positive bias), so an
    untrained gate reproduces the base model. `num_layers` counts gates: one per token slot (the
    layers, or with reuse the slots of RoutedConfig.token_path); `init_bias` may give one bias per
    gate (a reuse slot starts closed, so that the untrained student is still the base model).
    """

    def __init__(self, num_layers: int, hidden_size: int, init_bias: float | list[float] = 1.0) -> None:
        super().__init__()
        biases = list(init_bias) if isinstance(init_bias, (list, tuple)) else [init_bias] * num_layers
        if len(biases) != num_layers:
            raise RadialError(f"init_bias gives {len(biases)} biases for {num_layers} gates")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.init_bias = init_bias if not isinstance(init_bias, tuple) else list(init_bias)
        self.gates = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        for gate, bias in zip(self.gates, biases):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, bias)

    def init_kwargs(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "init_bias": self.init_bias}

    def forward(
        self, layer_idx: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        gate = self.gates[layer_idx]
        return gate(hidden_states.to(gate.weight.dtype)).squeeze(-1)


@register_router
class RandomTokenRouter(TokenRouter):
    """Runs each (layer, token) with probability `fraction`, at random but reproducibly (tests, benchmarks).

    The draw depends only on the layer and the token's position among its example's real tokens
    (read from the attention mask), never on hidden states, so decisions are the same with and
    without a cache, batched or alone. Without an attention mask the positions are those of the
    input itself, so decode with a cache only with a mask (generate always passes one).
    """

    def __init__(self, num_layers: int, fraction: float = 0.5, seed: int = 0, max_positions: int = 4096) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.fraction = fraction
        self.seed = seed
        self.max_positions = max_positions
        draws = torch.rand(num_layers, max_positions, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("draws", draws, persistent=False)

    def init_kwargs(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "fraction": self.fraction,
            "seed": self.seed,
            "max_positions": self.max_positions,
        }

    def forward(
        self, layer_idx: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq = hidden_states.shape[:2]
        device = self.draws.device
        if attention_mask is None:
            positions = torch.arange(seq, device=device).expand(batch, seq)
        else:
            positions = (attention_mask.to(device).long().cumsum(-1) - 1)[:, -seq:].clamp(min=0)
        draws = self.draws[layer_idx][positions % self.max_positions]
        return (self.fraction - draws).to(hidden_states.device)


class FunctionRouter(Router):
    """Wrap a plain function `(layer_idx, hidden, mask) -> logits [batch, 3]` (tests, quick experiments).

    Not registered: it cannot be saved.
    """

    def __init__(self, num_layers: int, decide: Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]):
        super().__init__()
        self.num_layers = num_layers
        self.decide = decide

    def forward(self, layer_idx, hidden_states, attention_mask):
        return self.decide(layer_idx, hidden_states, attention_mask)


__all__ = [
    "DrLLMRouter",
    "FunctionRouter",
    "GateTokenRouter",
    "RandomTokenRouter",
    "Router",
    "RouterBudget",
    "TokenRouter",
    "build_router",
    "register_router",
    "router_spec",
    "windowed_mean_pool",
]
