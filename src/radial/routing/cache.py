"""The KV cache of a routed model: one storage per executed (layer, occurrence) slot.

A stock attention module writes its keys and values with `past_key_values.update(k, v,
self.layer_idx)`. Keyed by the layer index alone, a repeated layer would append twice into one
slot (Dr.LLM's bug), and examples that skip a layer would leave holes in a batched slot.
`RoutedCache` instead keeps one transformers cache layer per schedule step, i.e. per
(layer, occurrence), holding exactly the rows of the examples that execute it. Each layer call
receives a `SlotView` of its step's storage as `past_key_values`; the view ignores the layer
index the attention module passes. The schedule itself is stored in the cache: once prefill has
decided the paths they stay fixed while decoding.

The storage classes are transformers' own (`DynamicLayer`, `DynamicSlidingWindowLayer`, chosen
per layer exactly as `DynamicCache(config=...)` would), so masks and sliding windows behave as in
the base model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from radial.routing.paths import Step, paths_from_steps
from radial.utils import RadialError

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def layer_types_of(config: PreTrainedConfig) -> tuple[list[str], list[dict]]:
    """Per decoder layer: its attention type and the kwargs of its cache storage class."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    unsupported = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
    if unsupported:
        raise RadialError(
            f"routing supports attention layers of types {', '.join(ATTENTION_LAYER_TYPES)}; "
            f"{config.model_type} has {', '.join(unsupported)}"
        )
    return layer_types, layer_kwargs


class SlotView:
    """What one layer call sees as `past_key_values`: its own step's storage.

    Anything but `update` (rarely used by decoder layers) is answered by the whole cache.
    """

    __slots__ = ("storage", "cache")

    def __init__(self, storage: CacheLayerMixin, cache: "RoutedCache") -> None:
        self.storage = storage
        self.cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.storage.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


class RoutedCache(Cache):
    """`layers[s]` is the storage of schedule step `steps[s]` (rows `steps[s].row_list`)."""

    def __init__(
        self,
        config: PreTrainedConfig,
        batch_size: int,
        layout: tuple[list[str], list[dict]] | None = None,
    ) -> None:
        """`layout` is `layer_types_of(config)` when the caller has it already (reading it costs
        about as much as running a small decoder layer, once per forward)."""
        super().__init__(layers=[])
        self.layer_types, self.layer_kwargs = layout if layout is not None else layer_types_of(config)
        self.num_rows = batch_size
        self.steps: list[Step] = []
        self.seen_tokens = 0
        self.decided = False  # True once a prefill has fixed the schedule
        # Token routing with reuse: per reuse step, [rows, positions] True where a position left
        # keys and values there (only its visitors do; see RoutedForCausalLM).
        self.visited: dict[int, torch.Tensor] = {}

    def add_step(self, step: Step) -> SlotView:
        """Append a schedule step (during prefill) and return the view its layer call writes into."""
        if self.decided:
            raise RadialError("the routing of this cache is fixed; cannot add steps after prefill")
        storage = DYNAMIC_LAYER_TYPE_MAPPING[self.layer_types[step.layer]](**self.layer_kwargs[step.layer])
        self.steps.append(step)
        self.layers.append(storage)
        return SlotView(storage, self)

    def view(self, index: int) -> SlotView:
        return SlotView(self.layers[index], self)

    def finish_forward(self, num_new_tokens: int) -> None:
        """Called after every forward: the schedule is now fixed; count the new tokens."""
        self.decided = True
        self.seen_tokens += num_new_tokens

    # Lengths come from our own count: a batch that skipped every layer still has a position.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int:
        return self.num_rows

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def paths(self) -> list[tuple[int, ...]]:
        """Each example's path, as the schedule stored in this cache runs it."""
        return paths_from_steps(self.steps, self.num_rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows are only permuted among beams of one example, which share a path."""
        self.visited = {step: rows.index_select(0, beam_idx.to(rows.device)) for step, rows in self.visited.items()}
        beam_idx = beam_idx.tolist()
        for storage, step in zip(self.layers, self.steps):
            if step.all_rows:
                storage.reorder_cache(torch.tensor(beam_idx, device=storage.keys.device))
                continue
            position = {row: i for i, row in enumerate(step.row_list)}
            try:
                local = [position[beam_idx[row]] for row in step.row_list]
            except KeyError:
                raise RadialError("beam reordering mixed rows with different paths") from None
            storage.reorder_cache(torch.tensor(local, device=storage.keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RadialError("expanding a routed cache after prefill is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise RadialError("selecting rows of a routed cache is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise RadialError("cropping a routed cache (assisted decoding) is not supported")
