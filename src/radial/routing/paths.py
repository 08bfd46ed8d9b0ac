"""Layer paths and the batched schedule that runs them.

A *path* is the sequence of decoder-layer indices one example runs: `[0, 1, 2, 4, 4, 5]` skips
layer 3 and runs layer 4 twice. Dr.LLM's per-layer actions (0 skip, 1 execute, 2 repeat once)
describe exactly the non-decreasing paths; `path_to_counts` / `counts_to_path` convert between
the two views. Any path (also a non-monotone one such as `[0, 2, 1]`) can be run; monotone ones
are scheduled most efficiently.

A batch carries one path per example. `schedule` merges them into one list of `Step`s: each step
runs one stock layer on the rows (examples) that need it at that point. Each step also owns one
KV-cache slot, so every (layer, occurrence) an example executes writes its own cache storage.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch

from radial.utils import RadialError

SKIP, EXECUTE, REPEAT = 0, 1, 2  # Dr.LLM's per-layer actions (= how often the layer runs)


def validate_path(path: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The path as a tuple of ints, or a RadialError naming the bad entry."""
    checked = []
    for position, entry in enumerate(path):
        try:
            layer = operator.index(entry)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            layer = None
        if layer is None or isinstance(entry, bool):
            raise RadialError(f"path entry {position} is {entry!r}, not a layer index")
        if not 0 <= layer < num_layers:
            raise RadialError(f"path entry {position} is layer {layer}, outside 0..{num_layers - 1}")
        checked.append(layer)
    return tuple(checked)


def dense_path(num_layers: int) -> tuple[int, ...]:
    """Every layer once, in order: the base model."""
    return tuple(range(num_layers))


def is_monotone(path: Sequence[int]) -> bool:
    """True when the path never goes back to an earlier layer (what per-layer counts can describe)."""
    return all(a <= b for a, b in zip(path, path[1:]))


def path_to_counts(path: Sequence[int], num_layers: int) -> list[int]:
    """How often each layer runs: `[0,1,2,4,4,5]` over 6 layers -> `[1,1,1,0,2,1]`."""
    path = validate_path(path, num_layers)
    if not is_monotone(path):
        raise RadialError(f"path {list(path)} goes back to an earlier layer; per-layer counts cannot describe it")
    counts = [0] * num_layers
    for layer in path:
        counts[layer] += 1
    return counts


def counts_to_path(counts: Sequence[int]) -> tuple[int, ...]:
    """The monotone path that runs layer i `counts[i]` times: `[1,0,2]` -> `(0, 2, 2)`."""
    if any(int(c) < 0 for c in counts):
        raise RadialError(f"layer counts must be >= 0, got {list(counts)}")
    return tuple(layer for layer, count in enumerate(counts) for _ in range(int(count)))


def slots_of(path: Sequence[int]) -> list[tuple[int, int]]:
    """The (layer, occurrence) pairs a path executes, in order: `[4, 4]` -> `[(4, 0), (4, 1)]`."""
    seen: dict[int, int] = {}
    slots = []
    for layer in path:
        occurrence = seen.get(layer, 0)
        slots.append((layer, occurrence))
        seen[layer] = occurrence + 1
    return slots


@dataclass
class Step:
    """Run stock layer `layer` (its `occurrence`-th time) on the batch rows `rows`.

    `rows` is None when the step runs every row of the batch, which spares a gather and a
    scatter; otherwise it is a sorted LongTensor of row indices (`row_list` holds the same).
    """

    layer: int
    occurrence: int
    row_list: tuple[int, ...]
    batch_size: int
    rows: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.row_list) < self.batch_size and self.rows is None:
            self.rows = torch.tensor(self.row_list, dtype=torch.long)

    @property
    def all_rows(self) -> bool:
        return self.rows is None

    def to(self, device: torch.device) -> "Step":
        if self.rows is not None and self.rows.device != device:
            self.rows = self.rows.to(device)
        return self


def schedule(paths: Sequence[Sequence[int]]) -> list[Step]:
    """Merge per-example paths into batched steps.

    Repeatedly take, among the next (layer, occurrence) of every unfinished example, the
    smallest one, and run it on all examples for which it is next. Monotone paths are already
    sorted by (layer, occurrence), so this walks the layers once, bottom to top, and each
    (layer, occurrence) becomes exactly one step; other paths still run in their own order.
    """
    batch_size = len(paths)
    per_example = [slots_of(path) for path in paths]
    cursor = [0] * batch_size
    steps: list[Step] = []
    while True:
        pending = [per_example[e][cursor[e]] for e in range(batch_size) if cursor[e] < len(per_example[e])]
        if not pending:
            return steps
        slot = min(pending)
        rows = tuple(
            e for e in range(batch_size) if cursor[e] < len(per_example[e]) and per_example[e][cursor[e]] == slot
        )
        for e in rows:
            cursor[e] += 1
        steps.append(Step(slot[0], slot[1], rows, batch_size))


def paths_from_steps(steps: Sequence[Step], batch_size: int) -> list[tuple[int, ...]]:
    """Each example's path, read back from a schedule (e.g. one a router decided)."""
    paths: list[list[int]] = [[] for _ in range(batch_size)]
    for step in steps:
        for row in step.row_list:
            paths[row].append(step.layer)
    return [tuple(p) for p in paths]
