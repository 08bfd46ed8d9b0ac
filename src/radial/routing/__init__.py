"""Routed models: per-example layer paths over a stock Hugging Face causal LM.

    from radial.routing import RoutedForCausalLM, DrLLMRouter, RouterBudget

    routed = RoutedForCausalLM.from_base(base_model, paths=[0, 1, 2, 4, 4, 5])   # static path
    routed(input_ids, attention_mask=mask).logits
    routed.generate(input_ids, attention_mask=mask, max_new_tokens=20, paths=[[0, 1], [0, 2, 2]])
    routed.set_router(DrLLMRouter(num_layers, hidden_size), RouterBudget(skip_bias=0.5))
    routed.set_router(GateTokenRouter(num_layers, hidden_size), token_skip="mlp")   # token-level, sparse
    routed.token_execution                 # "sparse", or "reference (reason: ...)"
    routed.save_pretrained(out_dir)        # routing config + router weights + base reference
    RoutedForCausalLM.from_pretrained(out_dir)   # or AutoModelForCausalLM.from_pretrained(out_dir)

Importing this package registers the routed config/model with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from radial.routing.backbone import Backbone
from radial.routing.cache import RoutedCache
from radial.routing.early_exit import ConfidenceExitRouter
from radial.routing.model import (
    RoutedConfig,
    RoutedForCausalLM,
    attention_masks,
    reference_forward,
)
from radial.routing.paths import (
    EXECUTE,
    REPEAT,
    SKIP,
    Step,
    counts_to_path,
    dense_path,
    is_monotone,
    path_to_counts,
    schedule,
    slots_of,
    validate_path,
)
from radial.routing.routers import (
    DrLLMRouter,
    FunctionRouter,
    GateTokenRouter,
    RandomTokenRouter,
    Router,
    RouterBudget,
    TokenRouter,
    build_router,
    register_router,
    router_spec,
    windowed_mean_pool,
)
from radial.routing.sparse import TOKEN_SKIPS, SparseFallbackWarning

AutoConfig.register(RoutedConfig.model_type, RoutedConfig, exist_ok=True)
AutoModelForCausalLM.register(RoutedConfig, RoutedForCausalLM, exist_ok=True)

__all__ = [
    "EXECUTE",
    "REPEAT",
    "SKIP",
    "TOKEN_SKIPS",
    "Backbone",
    "ConfidenceExitRouter",
    "DrLLMRouter",
    "FunctionRouter",
    "GateTokenRouter",
    "RandomTokenRouter",
    "RoutedCache",
    "RoutedConfig",
    "RoutedForCausalLM",
    "Router",
    "RouterBudget",
    "SparseFallbackWarning",
    "Step",
    "TokenRouter",
    "attention_masks",
    "build_router",
    "counts_to_path",
    "dense_path",
    "is_monotone",
    "path_to_counts",
    "reference_forward",
    "register_router",
    "router_spec",
    "schedule",
    "slots_of",
    "validate_path",
    "windowed_mean_pool",
]
