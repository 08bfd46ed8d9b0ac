"""`RoutedForCausalLM`: a Hugging Face causal LM whose examples run their own layer paths.

It wraps a loaded model's stock modules (embeddings, rotary embedding, decoder layers, final
norm, LM head) and drives them the way the model's own forward does (LlamaModel.forward,
Qwen2Model.forward, MistralModel.forward in transformers 5): embed, build the causal / sliding
masks and rotary embeddings once, call decoder layers, norm, project. What differs is which
layers run, on which rows: a schedule of steps (see radial.routing.paths), one per executed
(layer, occurrence), each on the rows of the examples that run it.

Routing modes (config.routing_mode):
- "dense": every layer once (the base model);
- "static": fixed path(s), one for all examples or one per example (MCTS, baselines);
- "router": a `Router` decides each example's path during prefill, layer by layer;
- "token": a `TokenRouter` decides per token per layer whether the token runs the layer
  (config.token_skip "layer") or only its MLP ("mlp"). At inference only the running tokens are
  computed, as one packed set (radial.routing.sparse); `token_execution` says whether every layer
  runs that way. Straight-through gate training, `token_execution_mode("reference")`, forward hooks
  on decoder layers and layers the sparse driver cannot decompose run the reference instead:
  every token computed, then selected.
A `paths=` argument to forward/generate overrides the mode for that call.

Reuse (Radial Networks' routing between layers, token mode with config.token_path): the router
has one gate per slot of a non-decreasing list of layers, e.g. [0, 0, 1, 1, 2, 2, ...]. After each
step a token's next slot is the first whose gate runs it: the same layer again (its second slot), a
later layer (the slots between are skipped), or none (exit; also once it has run
`budget.max_layers` slots, the maximum dynamic depth). Every slot is a step of the schedule with
its own cache entry, so keys and values are defined per (layer, occurrence):
- at a layer's first slot every token leaves the keys and values of the hidden state it carries
  into the slot, whether it runs the layer or not (as in plain token routing);
- at a second slot (a reuse) only the tokens that run it leave keys and values — those of the
  state their first visit produced — and a token running it attends to those alone. A token that
  skips a reuse slot costs nothing there: a reuse is paid by the tokens that take it.
The cache keeps, per reuse slot, which positions left keys there (`RoutedCache.visited`), so a
decoded token sees the same keys as in an uncached forward, and cached generation equals
uncached; slots run sparsely like any token step.

Once prefill has decided the paths they stay fixed: with a cache the schedule lives in the
`RoutedCache`; inside `generate` without a cache the first forward's paths are reused.

The routed model is a PreTrainedModel: `generate` works (greedy, batched, left padding), lm-eval's
HFLM accepts it, and save_pretrained / from_pretrained store only the routing config and router
weights next to a reference to the base weights.
"""

from __future__ import annotations

import copy
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.configuration_utils import SubConfigSpec
from transformers.masking_utils import (
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from radial.layers import find_decoder_layers
from radial.routing.backbone import Backbone
from radial.routing.cache import RoutedCache, SlotView, layer_types_of
from radial.routing.paths import Step, dense_path, is_monotone, paths_from_steps, schedule, validate_path
from radial.routing.routers import Router, RouterBudget, TokenRouter, build_router, router_spec
from radial.routing.sparse import (
    TOKEN_SKIPS,
    TokenBatch,
    attention_residual,
    decomposition_problem,
    describe_token_execution,
    mlp_residual,
    restrict_keys,
    run_layer_on_tokens,
    run_mlp_on_tokens,
    warn_fallback,
    write_keys_values,
    write_visitor_keys_values,
)
from radial.utils import RadialError

ROUTING_MODES = ("dense", "static", "router", "token")
TOKEN_EXECUTIONS = ("sparse", "reference")
ROUTER_WEIGHTS = "router.safetensors"
# Architectures whose model forward we have checked the generic driver against (tests cover
# llama, qwen2, mistral). Others are checked numerically against the base when wrapped.
# Config settings by which some families' forward does more than embed -> layers -> norm -> LM head;
# named when the equivalence check fails.
FORWARD_EXTRAS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "embedding_multiplier",
    "scale_emb",
    "residual_multiplier",
    "mup_width_multiplier",
)
_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_chunked_causal_mask,
}

Paths = Sequence[Sequence[int]]


class RoutedConfig(PreTrainedConfig):
    """Routing config plus a reference to the base weights (never a copy of them).

    text_config: the base model's config (generation, caches and lm-eval read it).
    base_model_name_or_path: where the base weights live (hub id or folder).
    base_model_relative_path: the same folder relative to the saved routed folder, tried first.
    routing_mode: one of "dense", "static", "router", "token".
    static_paths: for "static": one path for every example, or one per example.
    router: for "router"/"token": {"class": name, "kwargs": {...}}; weights in router.safetensors.
    budget: RouterBudget fields (skip_bias, repeat_bias, max_layers).
    token_skip: for "token": what a token the router skips leaves out, "layer" (the whole layer
        but its keys and values) or "mlp" (the MLP branch only; attention runs for every token).
    token_score_gap: for "token": > 0 scales what a running token's layer (or MLP) adds by
        1 + (sigmoid(routing logit) - 0.5) * gap, the logit being the router's minus the budget's
        skip_bias (> 0 runs), so a language-model loss reaches the router through its score (DLO's
        rescaling, scale_gap 0.05 there); 0 adds it unscaled.
    token_path: for "token": the slots a token may run, in order, as a non-decreasing list of layers
        (None: each layer once). A layer listed twice can be reused: a token may run it again right
        after (see "Reuse" in RoutedForCausalLM). The token router has one gate per slot.
    """

    model_type = "radial_routed"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    base_model_relative_path: str | None = None
    routing_mode: str = "dense"
    static_paths: list | None = None
    router: dict | None = None
    budget: dict | None = None
    token_skip: str = "layer"
    token_score_gap: float = 0.0
    token_path: list | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # PreTrainedConfig sets attn/experts implementation recursively on sub-configs; when we
        # wrap a live base config, inherit its choice instead of resetting it to None.
        if isinstance(self.text_config, PreTrainedConfig):
            kwargs.setdefault("attn_implementation", self.text_config._attn_implementation)
            kwargs.setdefault("experts_implementation", getattr(self.text_config, "_experts_implementation", None))
        super().__post_init__(**kwargs)


@dataclass
class _LayerInputs:
    """What every layer call of one forward shares (per-row slices are cached by row set)."""

    position_embeddings: dict[str, Any]  # per attention type: rotary (cos, sin), or None
    position_ids: torch.Tensor
    masks: dict[str, Any]
    layer_types: list[str]
    use_cache: bool
    kwargs: dict[str, Any]
    # The same masks materialized as [batch, 1, q, k] where packed queries gather their rows (the
    # stock calls keep `masks`, which may leave sdpa its is_causal shortcut); None: not needed.
    packed_masks: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._row_cache: dict[tuple, tuple] = {}

    def for_rows(self, step: Step) -> tuple[Any, torch.Tensor, Any]:
        """(mask, position_ids, position_embeddings) of the step's layer, restricted to the step's rows."""
        layer_type = self.layer_types[step.layer]
        rotary = self.position_embeddings[layer_type]
        if step.rows is None:
            return self.masks[layer_type], self.position_ids, rotary
        key = (step.row_list, layer_type)
        if key not in self._row_cache:
            self._row_cache[key] = (
                _select_rows(self.masks[layer_type], step.rows),
                _select_rows(self.position_ids, step.rows),
                None if rotary is None else tuple(_select_rows(table, step.rows) for table in rotary),
            )
        return self._row_cache[key]


def _select_rows(tensor: Any, rows: torch.Tensor) -> Any:
    """Rows of a batch-first tensor; tensors broadcast over the batch (dim 0 of size 1) stay as they are."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape[0] == 1:
        return tensor
    return tensor.index_select(0, rows)


def _as_path_list(paths: Any, num_layers: int) -> list[tuple[int, ...]]:
    """Accept one path ([0, 1, 3]) or one per example ([[0, 1], [0, 2, 2]]); validate each."""
    if isinstance(paths, torch.Tensor):
        paths = paths.tolist()
    paths = list(paths)
    if paths and all(isinstance(p, (list, tuple, torch.Tensor)) for p in paths):
        return [validate_path(list(p), num_layers) for p in paths]
    return [validate_path(paths, num_layers)]


@functools.lru_cache(maxsize=256)
def _cached_schedule(paths: tuple[tuple[int, ...], ...]) -> list[Step]:
    return schedule(paths)


class RoutedForCausalLM(PreTrainedModel, GenerationMixin):
    """A base causal LM plus routing. Build with `from_base`, reload with `from_pretrained`."""

    config_class = RoutedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    # The wrapped base's own modules carry the experts implementation (MoE decoders: Mixtral,
    # Qwen2-MoE); transformers would otherwise refuse a wrapper whose module source lacks its decorator.
    _can_set_experts_implementation_cached_value = True

    def __init__(
        self,
        config: RoutedConfig,
        base_model: PreTrainedModel | None = None,
        router: nn.Module | None = None,
    ) -> None:
        super().__init__(config)
        if config.routing_mode not in ROUTING_MODES:
            raise RadialError(f"routing_mode must be one of {', '.join(ROUTING_MODES)}, got {config.routing_mode!r}")
        if base_model is None:  # random weights of the right shape (from_pretrained loads real ones)
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        self.text_config = base_model.config
        config.text_config = base_model.config
        # Keep the backbone at `model` and the head at `lm_head`, as in LlamaForCausalLM, so
        # find_decoder_layers and state-dict names work as for the base model.
        self.model = base_model.base_model
        self.lm_head = base_model.get_output_embeddings()
        self.parts = Backbone.of(base_model)
        head_name = next(name for name, module in base_model.named_modules() if module is self.lm_head)
        self._base_prefixes = {"model.": f"{base_model.base_model_prefix}.", "lm_head.": f"{head_name}."}
        self._cache_layout = layer_types_of(self.text_config)
        self.layer_types = self._cache_layout[0]
        self.router = router
        self._bind_router()
        self.budget = RouterBudget(**(config.budget or {}))
        self.token_path = tuple(validate_path(config.token_path, self.num_layers)) if config.token_path else None
        if self.token_path is not None and not is_monotone(self.token_path):
            raise RadialError(f"token_path must not go back to an earlier layer, got {list(self.token_path)}")
        slots = self.token_slots
        # Token slots that are a second visit of their layer (a reuse): only their visitors leave keys.
        self._reuse_slots = frozenset(index for index in range(1, len(slots)) if slots[index] == slots[index - 1])
        if self._reuse_slots and config.token_skip == "mlp":
            raise RadialError("token_path with a reused layer needs token_skip 'layer' (a reuse runs the whole layer)")
        self.static_paths = (
            [validate_path(p, self.num_layers) for p in config.static_paths] if config.static_paths else None
        )
        self._check_mode()
        if getattr(base_model, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base_model.generation_config)
        self._generate_memo: dict[str, Any] | None = None
        self.token_gates: list[torch.Tensor] | None = None  # filled inside straight_through_token_gates()
        self._token_run_records: list[dict[str, Any]] | None = None  # filled inside recording_token_runs()
        self.token_execution_preference = "sparse"  # see token_execution_mode()
        self._token_checks: dict[tuple, list[str | None]] = {}
        self._warned_fallbacks: set[str] = set()
        self.reset_layer_counter()
        self.post_init()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_base(
        cls,
        base: PreTrainedModel | str | os.PathLike,
        *,
        mode: str | None = None,
        paths: Any = None,
        router: nn.Module | None = None,
        budget: RouterBudget | dict | None = None,
        token_skip: str = "layer",
        token_score_gap: float = 0.0,
        token_path: Sequence[int] | None = None,
        **load_kwargs: Any,
    ) -> "RoutedForCausalLM":
        """Wrap a loaded model (or load one from a folder / hub id) with the given routing.

        mode defaults to "static" when paths are given, "router"/"token" for a router, else "dense".
        token_skip ("layer" or "mlp") is what a token skips in token mode.
        """
        if isinstance(base, (str, os.PathLike)):
            reference = str(base)
            base = AutoModelForCausalLM.from_pretrained(reference, **load_kwargs)
        else:
            reference = None
        num_layers = len(find_decoder_layers(base))  # a clear error first if there are none
        reference = reference or getattr(base, "name_or_path", None) or None
        if mode is None:
            mode = "static" if paths is not None else _router_mode(router) if router is not None else "dense"
        if isinstance(budget, RouterBudget):
            budget = budget.to_dict()
        config = RoutedConfig(
            text_config=base.config,
            base_model_name_or_path=reference,
            routing_mode=mode,
            static_paths=[list(p) for p in _as_path_list(paths, num_layers)] if paths is not None else None,
            router=router_spec(router) if router is not None and _is_registered(router) else None,
            budget=budget,
            token_skip=token_skip,
            token_score_gap=token_score_gap,
            token_path=list(token_path) if token_path is not None else None,
        )
        routed = cls(config, base_model=base, router=router)
        routed.check_equivalence(base)
        routed.train(base.training)
        return routed

    def _check_mode(self) -> None:
        mode = self.config.routing_mode
        if mode == "static" and not self.static_paths:
            raise RadialError("routing_mode 'static' needs static_paths")
        if mode == "router" and not isinstance(self.router, Router):
            raise RadialError("routing_mode 'router' needs a Router (example-level)")
        if mode == "token" and not isinstance(self.router, TokenRouter):
            raise RadialError("routing_mode 'token' needs a TokenRouter")
        slots = len(self.token_slots) if isinstance(self.router, TokenRouter) else self.num_layers
        if self.router is not None and getattr(self.router, "num_layers", slots) != slots:
            what = "token slots" if slots != self.num_layers else "layers"
            raise RadialError(f"router has {self.router.num_layers} layers, the base model {slots} {what}")
        if self.config.token_skip not in TOKEN_SKIPS:
            raise RadialError(f"token_skip must be one of {', '.join(TOKEN_SKIPS)}, got {self.config.token_skip!r}")
        if mode == "token" and self.config.token_skip == "mlp":
            for index, layer in enumerate(self.parts.layers):
                problem = decomposition_problem(layer, "mlp")
                if problem is not None:  # even the reference needs the MLP branch on its own
                    raise RadialError(f"token_skip 'mlp' cannot split decoder layer {index}: {problem}")

    @torch.no_grad()
    def check_equivalence(self, base_model: PreTrainedModel, atol: float = 1e-4) -> None:
        """Dense routing must reproduce the base model's own complete forward, `base_model(ids).logits`
        (embedding scaling, logit scaling or soft-capping: whatever the family does); refuse otherwise,
        naming the family and the difference."""
        ids = torch.arange(3, 9, device=self.device).remainder(self.text_config.vocab_size).unsqueeze(0)
        modes = base_model.training, self.training
        base_model.eval(), self.eval()
        try:
            expected = base_model(input_ids=ids, use_cache=False).logits
            routed = self(ids, paths=dense_path(self.num_layers), use_cache=False).logits
        finally:
            base_model.train(modes[0]), self.train(modes[1])
            self.reset_layer_counter()
        rtol = 0.0 if expected.dtype == torch.float32 else 2e-2  # half precision: a few units in the last place
        close = expected.shape == routed.shape and torch.allclose(
            expected.float(), routed.float(), atol=max(atol, rtol), rtol=rtol
        )
        if not close:
            difference = (
                f"logits of shape {tuple(expected.shape)} against {tuple(routed.shape)}"
                if expected.shape != routed.shape
                else f"max abs logit difference {(expected.float() - routed.float()).abs().max().item():.2e}"
            )
            extras = [
                f"{name}={getattr(self.text_config, name)}"
                for name in FORWARD_EXTRAS
                if getattr(self.text_config, name, None) not in (None, 0, 1, 1.0, False)
            ]
            raise RadialError(
                f"cannot route {self.text_config.model_type} ({type(base_model).__name__}): dense routing does not "
                f"reproduce the model's own forward ({difference})"
                + (f"; its config sets {', '.join(extras)}, which the routing driver does not apply" if extras else "")
                + "; see README, 'Model families', to add the family"
            )

    def base_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A routed state dict's base weights under the base model's own names (router weights left out):
        the backbone sits at `model` here, at the family's prefix there (`gpt_neox` for GPT-NeoX)."""
        renamed = {}
        for key, value in state.items():
            prefix = next((p for p in self._base_prefixes if key.startswith(p)), None)
            if prefix is not None:
                renamed[self._base_prefixes[prefix] + key.removeprefix(prefix)] = value
        return renamed

    # ----------------------------------------------------------------- routing controls
    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def token_slots(self) -> tuple[int, ...]:
        """The layers a token may run in token mode, one per router gate (config.token_path, or each once)."""
        return self.token_path if self.token_path is not None else tuple(dense_path(self.num_layers))

    def set_paths(self, paths: Any) -> None:
        """Static routing: one path for every example, or one path per example of each batch."""
        self.static_paths = _as_path_list(paths, self.num_layers)
        self.config.static_paths = [list(p) for p in self.static_paths]
        self.config.routing_mode = "static"

    def set_router(self, router: nn.Module, budget: RouterBudget | None = None, token_skip: str | None = None) -> None:
        """Router-decided (Router) or token-level (TokenRouter) routing."""
        self.router = router
        self._bind_router()
        self.config.routing_mode = _router_mode(router)
        self.config.router = router_spec(router) if _is_registered(router) else None
        if budget is not None:
            self.set_budget(budget)
        if token_skip is not None:
            self.config.token_skip = token_skip
        self._check_mode()

    def _bind_router(self) -> None:
        """A router that reads the model's own modules (an early exit's final norm and LM head) gets them."""
        bind = getattr(self.router, "bind", None)
        if callable(bind):
            bind(self.parts)

    def set_budget(self, budget: RouterBudget) -> None:
        self.budget = budget
        self.config.budget = budget.to_dict()

    def set_dense(self) -> None:
        self.config.routing_mode = "dense"

    @contextmanager
    def using_paths(self, paths: Any) -> Iterator[None]:
        """Temporarily route with static paths (restores the previous routing afterwards)."""
        saved = (self.config.routing_mode, self.static_paths, self.config.static_paths)
        self.set_paths(paths)
        try:
            yield
        finally:
            self.config.routing_mode, self.static_paths, self.config.static_paths = saved

    @contextmanager
    def straight_through_token_gates(self) -> Iterator[list[torch.Tensor]]:
        """Token mode made trainable: yields the list that collects one gate [batch, seq] per layer call.

        Inside, the forward still routes hard (a token runs the layer iff its logit > 0), so values
        equal inference exactly, but gradients reach the token router by the straight-through
        estimator through sigmoid(logit). Each gate's value is the hard decision (0 or 1), its
        gradient that of the sigmoid, so a compute penalty on the gates sees the real depth.
        """
        self.token_gates = []
        try:
            yield self.token_gates
        finally:
            self.token_gates = None

    @contextmanager
    def recording_token_runs(self) -> Iterator[list[dict[str, Any]]]:
        """Within: each token-routed forward appends which tokens ran each layer, for counting FLOPs.

        A record holds `runs` (per executed layer, the [batch, seq] tokens that ran it),
        `attention_mask` (as passed: [batch, keys] or None) and `logit_rows` (rows of logits computed);
        see radial.routing.flops.
        """
        records: list[dict[str, Any]] = []
        self._token_run_records = records
        try:
            yield records
        finally:
            self._token_run_records = None

    @contextmanager
    def token_execution_mode(self, execution: str) -> Iterator[None]:
        """Token mode runs "sparse" (the default: only running tokens are computed) or "reference"
        (every token computed, then selected: the oracle tests compare against) inside."""
        if execution not in TOKEN_EXECUTIONS:
            raise RadialError(f"token execution must be one of {', '.join(TOKEN_EXECUTIONS)}, got {execution!r}")
        saved = self.token_execution_preference
        self.token_execution_preference = execution
        try:
            yield
        finally:
            self.token_execution_preference = saved

    @property
    def token_execution(self) -> str:
        """How token mode runs at inference: "sparse", or "reference (reason: ...)" (evaluations record it).

        Straight-through gate training always runs the reference, whatever this says: its gradient
        needs every token's layer output.
        """
        if self.token_execution_preference == "reference":
            return "reference (reason: requested with token_execution_mode('reference'))"
        hooked = self._hooked_layers()
        if hooked is not None:
            return f"reference (reason: {hooked})"
        return describe_token_execution(self._token_fallback_reasons())

    def _hooked_layers(self) -> str | None:
        """With token_skip "layer", forward hooks on decoder layers expect every token's layer output."""
        if self.config.token_skip != "layer":
            return None
        hooked = [index for index, layer in enumerate(self.parts.layers) if layer._forward_hooks]
        if not hooked:
            return None
        return f"forward hooks on decoder layers {', '.join(map(str, hooked))} observe every token's layer output"

    def _sparse_token_reasons(self) -> list[str | None] | None:
        """Per layer of this token-mode forward: None where it runs sparsely, else why not; None for all reference."""
        if self.token_gates is not None or self.token_execution_preference == "reference":
            return None
        hooked = self._hooked_layers()
        if hooked is not None:
            self._warn_fallback_once(f"reference (reason: {hooked})")
            return None
        return self._token_fallback_reasons()

    def _token_fallback_reasons(self) -> list[str | None]:
        """Per layer, why the sparse driver cannot run it (None: it can); checked once per setting."""
        key = (self.config.token_skip, self.text_config._attn_implementation)
        if key not in self._token_checks:
            reasons = [self._sparse_layer_problem(index) for index in range(self.num_layers)]
            self._token_checks[key] = reasons
            self._warn_fallback_once(describe_token_execution(reasons))
        return self._token_checks[key]

    def _warn_fallback_once(self, description: str) -> None:
        if description != "sparse" and description not in self._warned_fallbacks:
            self._warned_fallbacks.add(description)
            warn_fallback(description)

    def _sparse_layer_problem(self, index: int) -> str | None:
        skip = self.config.token_skip
        problem = decomposition_problem(self.parts.layers[index], skip)
        if problem is None:
            problem = self._probe_sparse_layer(index)
        if problem is not None and skip == "mlp":
            raise RadialError(f"token_skip 'mlp' cannot split decoder layer {index}: {problem}")
        return problem

    @torch.no_grad()
    def _probe_sparse_layer(self, index: int, seq: int = 6) -> str | None:
        """Run the sparse driver on a few random tokens against the stock layer; a mismatch, described, or None.

        Two rows with different running tokens (so the packed queries need padding), keys and values
        included, then (where the stock layer takes no mask here) most positions running, attended
        in place: the parts the driver found must compose into exactly the layer's own forward.
        """
        layer, layer_type, skip = self.parts.layers[index], self.layer_types[index], self.config.token_skip
        weight = next(layer.parameters())
        generator = torch.Generator().manual_seed(index)
        hidden = torch.randn(2, seq, self.text_config.hidden_size, generator=generator)
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        rotary = self.parts.position_embeddings(hidden, position_ids, [layer_type])
        position_embeddings = rotary[layer_type]
        masks = attention_masks(self.text_config, {layer_type}, hidden, None, None, position_ids, materialize=True)
        steps = torch.arange(seq, device=hidden.device)
        run = torch.stack([steps % 3 != 1, steps % 4 == 1])
        stock_cache, sparse_cache = _KeyValueRecorder(), _KeyValueRecorder()
        common = dict(position_ids=position_ids, position_embeddings=position_embeddings, use_cache=True)
        was_training = layer.training
        layer.eval()
        try:
            # layer.forward, not layer(...): hooks that count layer calls should not count the probe.
            mask = masks[layer_type]
            full = self.parts.call_layer(layer.forward, hidden, mask=mask, past_key_values=stock_cache, **common)
            if skip == "layer":
                batch = TokenBatch(hidden, None, masks, rotary)
                got = run_layer_on_tokens(layer, hidden, batch.running(run), batch, layer_type, sparse_cache)
                expected = torch.where(run.unsqueeze(-1), full, hidden)
                stock_masks = attention_masks(self.text_config, {layer_type}, hidden, None, None, position_ids)
                if stock_masks[layer_type] is None:  # most positions running, no mask: attended in place
                    most = steps.expand(2, seq) != 2
                    batch = TokenBatch(hidden, None, masks, rotary, stock_masks)
                    in_place = run_layer_on_tokens(layer, hidden, batch.running(most), batch, layer_type, None)
                    got = torch.cat([got, in_place])
                    expected = torch.cat([expected, torch.where(most.unsqueeze(-1), full, hidden)])
            else:
                mid = attention_residual(layer, hidden, mask=mask, past_key_values=sparse_cache, **common)
                got, expected = mlp_residual(layer, mid), full
        except Exception as error:  # noqa: BLE001 - any failure means: not decomposable this way
            return f"the sparse driver failed on it ({type(error).__name__}: {error})"
        finally:
            layer.train(was_training)
        tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
        if len(stock_cache.stored) != 2 or len(sparse_cache.stored) != 2:
            return f"its cache writes differ from the stock {type(layer).__name__} forward"
        compared = {"outputs": (got, expected), "keys": (sparse_cache.stored[0], stock_cache.stored[0])}
        compared["values"] = (sparse_cache.stored[1], stock_cache.stored[1])
        for name, (a, b) in compared.items():
            if a.shape != b.shape or (a - b).abs().max() > tolerance * b.abs().max().clamp(min=1):
                return f"its {name} differ from the stock {type(layer).__name__} forward"
        return None

    # ----------------------------------------------------------------- layer counting
    def reset_layer_counter(self) -> None:
        self._executed_layers_sum = 0.0
        self._example_forwards = 0

    def radial_executed_layers(self) -> float:
        """Average decoder layers executed per example per forward call since the last reset.

        Every forward counts each batch row once: a prefill (or an lm-eval loglikelihood call) and
        each decoding step alike, so a dense model gives exactly L. A repeated layer counts twice.
        In token mode an example's count is the mean over its real tokens of layers executed (of
        MLPs executed, with token_skip "mlp").
        """
        if self._example_forwards == 0:
            return float("nan")
        return self._executed_layers_sum / self._example_forwards

    # ----------------------------------------------------------------- forward
    def get_input_embeddings(self) -> nn.Module:
        return self.parts.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.parts.lm_head

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to tie: the base modules are used as loaded (already tied if the base ties them)."""

    def init_weights(self) -> None:
        """Never re-initialise: the base weights come loaded and routers initialise themselves.

        (PreTrainedModel.post_init would otherwise re-draw every weight of the wrapped model.)
        """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        paths: Any = None,
        decision_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The causal LM forward; `paths` overrides the routing for this call.

        decision_mask ([batch, seq], default: attention_mask) marks the tokens an example-level
        router reads to decide the example's path: the context (prompt) when the input also holds a
        continuation to score, so that every continuation of one question runs the path decided for
        its context, whatever the batch around it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise RadialError(f"{unsupported} is not supported by the routed model")
        kwargs.pop("return_dict", None)
        batch_size, seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if use_cache is None:
            use_cache = bool(getattr(self.text_config, "use_cache", True)) and not self.training
        cache = self._cache_for(past_key_values, use_cache, batch_size)
        if position_ids is None:
            past_seen = cache.seen_tokens if cache is not None else 0
            device = (input_ids if inputs_embeds is None else inputs_embeds).device
            position_ids = self.parts.default_position_ids(attention_mask, past_seen, seq_len, device)
        hidden = self.parts.embed(input_ids, inputs_embeds, position_ids)
        token_router = self.router if self.config.routing_mode == "token" and paths is None else None
        sparse_reasons = self._sparse_token_reasons() if token_router is not None else None
        masks = self._masks(hidden, attention_mask, cache, position_ids)
        packed_masks = None
        packed = self.config.token_skip == "layer" and sparse_reasons is not None and None in sparse_reasons
        if packed or (token_router is not None and self._reuse_slots):
            # Packed queries gather rows of the mask, and reuse slots restrict it to their visitors,
            # so it must exist even where sdpa would infer it.
            packed_masks = masks
            if any(not isinstance(mask, torch.Tensor) for mask in masks.values()):
                packed_masks = self._masks(hidden, attention_mask, cache, position_ids, materialize=True)
        layer_inputs = _LayerInputs(
            position_embeddings=self.parts.position_embeddings(hidden, position_ids, self.layer_types),
            position_ids=position_ids,
            masks=masks,
            layer_types=self.layer_types,
            use_cache=cache is not None,
            kwargs=kwargs,
            packed_masks=packed_masks,
        )

        if token_router is not None:
            decided = cache is not None and cache.decided
            steps = cache.steps if decided else _cached_schedule((self.token_slots,) * batch_size)
            hidden = self._run_tokens(hidden, steps, layer_inputs, cache, token_router, attention_mask, sparse_reasons)
        elif cache is not None and cache.decided:
            steps = cache.steps
            hidden = self._run_fixed(hidden, steps, layer_inputs, cache)
        else:
            fixed = self._fixed_paths(paths, batch_size)
            if fixed is None:
                decision = attention_mask if decision_mask is None else decision_mask
                hidden, steps = self._run_router(hidden, layer_inputs, cache, decision)
            else:
                steps = _cached_schedule(tuple(fixed))
                hidden = self._run_fixed(hidden, steps, layer_inputs, cache)
        if self._generate_memo is not None and "paths" not in self._generate_memo and token_router is None:
            self._generate_memo["paths"] = paths_from_steps(steps, batch_size)
        if token_router is None:
            self._count(sum(len(step.row_list) for step in steps), batch_size)
        if cache is not None:
            cache.finish_forward(seq_len)

        hidden = self.parts.final(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.parts.logits(hidden[:, keep, :])
        if token_router is not None and self._token_run_records:
            self._token_run_records[-1]["logit_rows"] = logits.shape[0] * logits.shape[1]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _cache_for(self, past_key_values: Cache | None, use_cache: bool, batch_size: int) -> RoutedCache | None:
        if isinstance(past_key_values, RoutedCache):
            if past_key_values.batch_size != batch_size:
                raise RadialError(
                    f"the routed cache holds {past_key_values.batch_size} rows, the input has {batch_size}"
                )
            return past_key_values
        if past_key_values is not None:
            # generate() hands over a fresh DynamicCache; an empty one is replaced by ours.
            if past_key_values.get_seq_length() > 0:
                raise RadialError("a routed model needs a RoutedCache; got a filled " + type(past_key_values).__name__)
            return RoutedCache(self.text_config, batch_size, self._cache_layout)
        return RoutedCache(self.text_config, batch_size, self._cache_layout) if use_cache else None

    def _masks(self, hidden, attention_mask, cache, position_ids, materialize: bool = False) -> dict[str, Any]:
        """One mask per attention type, built before any layer writes into the cache.

        A right-padded batch with nothing cached (lm-eval's loglikelihood batches) gets the causal
        mask alone: a real token never sees the padding after it, so its outputs are the same, and
        attention skips building and applying a padding mask (4-8 % of a forward at the embedded size).
        """
        if attention_mask is not None and (cache is None or cache.seen_tokens == 0) and _right_padded(attention_mask):
            attention_mask = None
        needed = set(self.layer_types)
        if cache is not None and cache.decided:
            needed = {self.layer_types[step.layer] for step in cache.steps} or {self.layer_types[0]}
        return attention_masks(
            self.text_config, needed, hidden, attention_mask, cache, position_ids, materialize=materialize
        )

    def _fixed_paths(self, paths: Any, batch_size: int) -> list[tuple[int, ...]] | None:
        """The per-example paths of this forward, or None when the router is to decide them."""
        if paths is not None:
            path_list = _as_path_list(paths, self.num_layers)
        elif self._generate_memo is not None and "paths" in self._generate_memo:
            path_list = self._generate_memo["paths"]
        elif self.config.routing_mode == "static":
            path_list = self.static_paths
        elif self.config.routing_mode == "dense":
            path_list = [dense_path(self.num_layers)]
        else:
            return None
        if len(path_list) == 1:
            return path_list * batch_size
        if len(path_list) != batch_size:
            raise RadialError(f"got {len(path_list)} per-example paths for a batch of {batch_size}")
        return list(path_list)

    def _call_layer(self, step: Step, hidden: torch.Tensor, inputs: _LayerInputs, view: SlotView | None):
        """Run one stock decoder layer on the step's rows, called as the model's own forward calls it."""
        return self._on_step_rows(self.parts.call_layer, step, hidden, inputs, view)

    def _attention_residual(self, step, hidden, inputs, view) -> torch.Tensor:
        """The step's layer up to its attention residual (token_skip "mlp": every token runs this part)."""
        return self._on_step_rows(attention_residual, step, hidden, inputs, view)

    def _on_step_rows(
        self, function, step: Step, hidden: torch.Tensor, inputs: _LayerInputs, view, mask: Any = None
    ) -> torch.Tensor:
        """`function(layer, hidden, ...)` on the rows of the examples that run the step; other rows
        unchanged. `mask` replaces the step's attention mask (token mode: all rows)."""
        step_mask, position_ids, position_embeddings = inputs.for_rows(step)
        mask = step_mask if mask is None else mask
        rows_hidden = hidden if step.rows is None else hidden.index_select(0, step.rows)
        out = function(
            self.parts.layers[step.layer],
            rows_hidden,
            mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            past_key_values=view,
            use_cache=inputs.use_cache,
            **inputs.kwargs,
        )
        return out if step.rows is None else hidden.index_copy(0, step.rows, out)

    def _run_fixed(self, hidden, steps, inputs, cache) -> torch.Tensor:
        """Run a known schedule: static paths, or the paths a cache fixed at prefill."""
        for index, step in enumerate(steps):
            hidden = self._call_layer(step, hidden, inputs, self._step_view(cache, index, step.to(hidden.device)))
        return hidden

    @staticmethod
    def _step_view(cache: RoutedCache | None, index: int, step: Step) -> SlotView | None:
        """The cache slot step `index` writes into (added while prefill builds the schedule)."""
        if cache is None:
            return None
        return cache.view(index) if cache.decided else cache.add_step(step)

    def _run_tokens(self, hidden, steps, inputs, cache, token_router, attention_mask, sparse_reasons) -> torch.Tensor:
        """Token mode: before each layer the router picks the tokens that run it (or its MLP).

        sparse_reasons[layer] is None where the layer runs sparsely (only running tokens computed);
        elsewhere, or for all layers when sparse_reasons is None, the reference computes every token
        and selects.
        """
        batch = None
        if sparse_reasons is not None and all(step.rows is None for step in steps):
            batch = TokenBatch(
                hidden, attention_mask, inputs.packed_masks or inputs.masks, inputs.position_embeddings, inputs.masks
            )
        executed_tokens = None
        for index, step in enumerate(steps):
            view = self._step_view(cache, index, step.to(hidden.device))
            logits = token_router(index, hidden, attention_mask)  # slot index = layer without reuse
            if self.budget.skip_bias:
                logits = logits - self.budget.skip_bias
            run = logits > 0
            if self.budget.max_layers is not None and executed_tokens is not None:
                run = run & (executed_tokens < self.budget.max_layers)  # the maximum dynamic depth: exit
            scale = self._output_scale(logits)
            visitors = None
            if index in self._reuse_slots:
                visitors = self._reuse_visitors(index, run, attention_mask, cache)
            if batch is not None and sparse_reasons[step.layer] is None:
                hidden = self._sparse_token_step(step, hidden, inputs, view, run, batch, scale, visitors)
            else:
                hidden = self._reference_token_step(step, hidden, inputs, view, logits, run, scale, visitors)
            executed_tokens = run.float() if executed_tokens is None else executed_tokens.add_(run)
            if self._token_run_records is not None:
                if index == 0:
                    reuses = [slot in self._reuse_slots for slot in range(len(steps))]
                    self._token_run_records.append(
                        {"runs": [], "attention_mask": attention_mask, "logit_rows": 0, "reuse_slots": reuses}
                    )
                self._token_run_records[-1]["runs"].append(run.detach())
        self._count_tokens(executed_tokens, attention_mask, hidden.shape[0])
        return hidden

    @staticmethod
    def _reuse_visitors(index: int, run, attention_mask, cache: RoutedCache | None) -> torch.Tensor:
        """[batch, keys]: the positions, cached ones first, that left keys and values at reuse slot `index`."""
        visitors = run if attention_mask is None else run & attention_mask[:, -run.shape[1] :].bool()
        if cache is not None:
            if index in cache.visited:
                visitors = torch.cat([cache.visited[index], visitors], dim=1)
            cache.visited[index] = visitors
        return visitors

    def _output_scale(self, logits: torch.Tensor) -> torch.Tensor | None:
        """DLO's score on what a running token's layer (or MLP) adds; None without token_score_gap."""
        gap = self.config.token_score_gap
        if not gap:
            return None
        return (1.0 + (torch.sigmoid(logits.float()) - 0.5) * gap).unsqueeze(-1)

    @staticmethod
    def _scaled(skipped: torch.Tensor, computed: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """skipped + scale * (computed - skipped): what the running tokens add, scaled by their score."""
        if scale is None:
            return computed
        return skipped + (scale * (computed - skipped).float()).to(computed.dtype)

    def _sparse_token_step(self, step, hidden, inputs, view, run, batch: TokenBatch, scale=None, visitors=None):
        """One layer computed for the running real tokens only (see radial.routing.sparse); at a reuse
        slot (`visitors`: [batch, keys], the positions that left keys there) only they leave keys."""
        layer = self.parts.layers[step.layer]
        running = batch.running(run)
        if visitors is not None:
            layer_type = self.layer_types[step.layer]
            if running.count == 0:
                if view is not None:  # no keys to leave here; the cache keeps its length
                    nobody = hidden.new_empty(0, hidden.shape[-1])
                    write_visitor_keys_values(layer, nobody, running.tokens, batch, layer_type, view)
                return hidden
            out = run_layer_on_tokens(layer, hidden, running, batch, layer_type, view, visitors, **inputs.kwargs)
            return self._scaled(hidden, out, scale)
        if self.config.token_skip == "mlp":
            mid = self._attention_residual(step, hidden, inputs, view)
            if running.count == 0:
                return mid
            if running.every_token:
                return self._scaled(mid, mlp_residual(layer, mid), scale)
            return run_mlp_on_tokens(layer, mid, running, scale)
        if running.count == 0:  # only the keys and values later tokens attend to (none without a cache)
            if view is not None:
                write_keys_values(layer, layer.input_layernorm(hidden), batch, self.layer_types[step.layer], view)
            return hidden
        layer_type = self.layer_types[step.layer]
        if running.every_token or (running.every_real_token and inputs.masks[layer_type] is None):
            # Every real token runs, and the stock call needs no mask (right padding, nothing cached
            # before): the whole batch through sdpa's causal kernel costs less than packing out the
            # padding, whose results and keys no real token reads.
            return self._scaled(hidden, self._call_layer(step, hidden, inputs, view), scale)
        out = run_layer_on_tokens(layer, hidden, running, batch, layer_type, view, **inputs.kwargs)
        return self._scaled(hidden, out, scale)

    def _reference_token_step(self, step, hidden, inputs, view, logits, run, scale=None, visitors=None):
        """One layer (or MLP) computed for every token, then each token keeps its routed result.
        At a reuse slot every token's keys are written but only the visitors' are attended to (and a
        token's own, so that a token that skips gets what taking the slot would give it: the
        straight-through gradient's counterfactual)."""
        if self.config.token_skip == "mlp":
            skipped = self._attention_residual(step, hidden, inputs, view)
            computed = mlp_residual(self.parts.layers[step.layer], skipped)
        elif visitors is not None:
            mask = inputs.packed_masks[self.layer_types[step.layer]]
            mask = restrict_keys(mask, visitors, hidden.shape[0], own_keys=True)
            skipped = hidden
            computed = self._on_step_rows(self.parts.call_layer, step, hidden, inputs, view, mask=mask)
        else:
            skipped, computed = hidden, self._call_layer(step, hidden, inputs, view)
        computed = self._scaled(skipped, computed, scale)
        routed_hidden = torch.where(run.unsqueeze(-1), computed, skipped)
        if self.token_gates is not None:
            # Straight-through: the value is exactly the hard routing above, the gradient reaches
            # the router through sigmoid(logits) as if the token ran the layer that much.
            soft = torch.sigmoid(logits.float())
            through = (soft - soft.detach()).to(hidden.dtype).unsqueeze(-1)
            routed_hidden = routed_hidden + through * (computed - skipped)
            self.token_gates.append(run.float() + (soft - soft.detach()))
        return routed_hidden

    def _run_router(self, hidden, inputs, cache, decision_mask) -> tuple[torch.Tensor, list[Step]]:
        """Prefill with an example-level router: decide layer i from the hidden states entering it,
        at the tokens `decision_mask` marks (the prompt's real tokens)."""
        batch_size = hidden.shape[0]
        executed = torch.zeros(batch_size, dtype=torch.long, device=hidden.device)
        steps: list[Step] = []
        for layer in range(self.num_layers):
            actions = self.budget.actions(self.router(layer, hidden, decision_mask), executed)
            executed += actions
            counts = actions.tolist()
            for occurrence in range(max(counts)):
                rows = tuple(e for e in range(batch_size) if counts[e] > occurrence)
                step = Step(layer, occurrence, rows, batch_size).to(hidden.device)
                view = cache.add_step(step) if cache is not None else None
                hidden = self._call_layer(step, hidden, inputs, view)
                steps.append(step)
        return hidden, steps

    def _count(self, executed: float, batch_size: int) -> None:
        self._executed_layers_sum += float(executed)
        self._example_forwards += batch_size

    def _count_tokens(self, executed_tokens: torch.Tensor | None, attention_mask, batch_size: int) -> None:
        if executed_tokens is None:  # no layer at all
            self._count(0.0, batch_size)
            return
        seq = executed_tokens.shape[1]
        valid = (
            torch.ones_like(executed_tokens)
            if attention_mask is None
            else attention_mask[:, -seq:].to(executed_tokens.dtype)
        )
        per_example = (executed_tokens * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        self._count(per_example.sum().item(), batch_size)

    # ----------------------------------------------------------------- generation
    def generate(self, *args: Any, **kwargs: Any):
        """`GenerationMixin.generate`, with the prefill's paths fixed for the whole call.

        With the cache the schedule lives in the RoutedCache; without it (use_cache=False), every
        step re-runs the whole sequence, and we reuse the paths the first forward decided rather
        than let the router re-decide on the grown sequence.
        """
        self._generate_memo = {}
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._generate_memo = None

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write config.json (routing + base reference), router weights, generation config.

        The base weights are not copied: config.base_model_name_or_path points at them (and, for
        a local folder, base_model_relative_path at the same folder from `save_directory`).
        """
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        reference = config.base_model_name_or_path
        if reference and Path(reference).is_dir():
            config.base_model_name_or_path = str(Path(reference).resolve())
            config.base_model_relative_path = os.path.relpath(Path(reference).resolve(), save_directory.resolve())
        if self.router is not None:
            if config.router is None:
                raise RadialError(f"router class {type(self.router).__name__} is not registered; cannot save it")
            state = {k: v.detach().contiguous().cpu() for k, v in self.router.state_dict().items()}
            save_file(state, str(save_directory / ROUTER_WEIGHTS))
        config.architectures = [type(self).__name__]
        config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, config: RoutedConfig | None = None, **kwargs
    ) -> "RoutedForCausalLM":
        """Load a saved routed model: its config, the base weights it references, its router.

        Extra kwargs (dtype, device_map, attn_implementation, ...) go to the base model's
        from_pretrained.
        """
        from safetensors.torch import load_file

        folder = Path(pretrained_model_name_or_path)
        if config is None or not isinstance(config, RoutedConfig):
            config = RoutedConfig.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(_resolve_base(config, folder), **kwargs)
        router = None
        if config.router is not None:
            router = build_router(config.router)
            weights = folder / ROUTER_WEIGHTS
            if not weights.is_file():
                raise RadialError(f"{folder}: routing config names a router but {ROUTER_WEIGHTS} is missing")
            router.load_state_dict(load_file(str(weights)))
            router.to(device=base.device)
        config.text_config = base.config
        routed = cls(config, base_model=base, router=router)
        routed.eval()
        return routed


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row's real tokens come first (no padding at all included)."""
    if attention_mask.ndim != 2:
        return False
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def attention_masks(
    config: PreTrainedConfig,
    layer_types: Iterable[str],
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Any,
    position_ids: torch.Tensor,
    *,
    materialize: bool = False,
) -> dict[str, Any]:
    """One attention mask per attention type in `layer_types`, built as the model's own forward builds them.

    `past_key_values` is whatever tells the mask functions how many tokens precede `hidden`
    (a Cache, or any object answering `get_query_offset` and `get_mask_sizes` like one); None
    when nothing does. `materialize` builds a 4-D mask even where sdpa would rely on is_causal.
    """
    extra = {"allow_is_causal_skip": False} if materialize else {}
    return {
        layer_type: _MASK_FUNCTIONS[layer_type](
            config=config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            **extra,
        )
        for layer_type in set(layer_types)
    }


class _KeyValueRecorder:
    """A stand-in cache that keeps what one layer call writes (the sparse probe compares them)."""

    def __init__(self) -> None:
        self.stored: tuple[torch.Tensor, ...] = ()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.stored = (key_states, value_states)
        return key_states, value_states


def _resolve_base(config: RoutedConfig, folder: Path) -> str:
    """Where to load the base weights from: the relative reference if it exists, else the stored one."""
    if config.base_model_relative_path:
        candidate = (folder / config.base_model_relative_path).resolve()
        if candidate.is_dir():
            return str(candidate)
    if not config.base_model_name_or_path:
        raise RadialError(f"{folder}/config.json: base_model_name_or_path is missing")
    return config.base_model_name_or_path


def _router_mode(router: nn.Module) -> str:
    if isinstance(router, TokenRouter):
        return "token"
    if isinstance(router, Router):
        return "router"
    raise RadialError(f"{type(router).__name__} is neither a Router nor a TokenRouter")


def _is_registered(router: nn.Module) -> bool:
    from radial.routing.routers import ROUTER_CLASSES

    return ROUTER_CLASSES.get(type(router).__name__) is type(router)


def reference_forward(base_model: PreTrainedModel, input_ids: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
    """Logits of one path by the plainest possible loop over the stock layers (no cache, batch as is).

    The routed model must agree with this for every path; it is deliberately independent of the
    schedule, the cache and the masks' row selection.
    """
    parts = Backbone.of(base_model)
    position_ids = parts.default_position_ids(None, 0, input_ids.shape[1], input_ids.device)
    hidden = parts.embed(input_ids, None, position_ids)
    layer_types, _ = layer_types_of(base_model.config)
    rotary = parts.position_embeddings(hidden, position_ids, layer_types)
    masks = attention_masks(base_model.config, layer_types, hidden, None, None, position_ids)
    for layer in path:
        hidden = parts.call_layer(
            parts.layers[layer],
            hidden,
            mask=masks[layer_types[layer]],
            position_ids=position_ids,
            position_embeddings=rotary[layer_types[layer]],
        )
    return parts.head(hidden)
