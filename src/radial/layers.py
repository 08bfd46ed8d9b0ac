"""Find the stock decoder layers of a Hugging Face causal LM, whatever its architecture.

Llama, Qwen2, Mistral, Gemma, Phi3 ... keep them at `model.model.layers`; GPT-2 style models at
`transformer.h`. We look for the one `nn.ModuleList` of identical blocks rather than
hard-coding per architecture.
"""

from __future__ import annotations

from torch import nn

from radial.utils import RadialError

_KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "transformer.layers", "gpt_neox.layers")


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ModuleList holding the decoder blocks; a clear error if there is none."""
    for dotted in _KNOWN_PATHS:
        layers = _get(model, dotted)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1
    ]
    if len(candidates) == 1:
        return candidates[0][1]
    found = ", ".join(name for name, _ in candidates) or "none"
    raise RadialError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for {', '.join(_KNOWN_PATHS)} "
        f"and for a single ModuleList of identical blocks (found: {found})"
    )


def layer_parts(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The attention and MLP sub-blocks of a pre-norm decoder layer, or None where absent."""
    attention = next((getattr(layer, n) for n in ("self_attn", "attention", "attn") if hasattr(layer, n)), None)
    mlp = next((getattr(layer, n) for n in ("mlp", "feed_forward", "ffn") if hasattr(layer, n)), None)
    return attention, mlp
