"""Monte Carlo Tree Search for the shortest layer path that answers an example correctly (Dr.LLM).

The search tree is a tree of *edits* to the default path (every layer once). Each node is a
complete path, given by how often each layer runs (Dr.LLM's per-layer labels: 0 skip, 1 execute,
2 repeat). A child applies one more edit at or after its parent's last edit:

    skip(i)       layer i runs 0 times          (skip 1 layer)
    skip(i, i+1)  layers i and i+1 run 0 times  (skip 2 consecutive layers; up to `max_skip`)
    repeat(i)     layer i runs twice            (repeat one layer once)

Edits move strictly forward through the layers, so a layer is edited at most once, every path
with per-layer counts in {0, 1, 2} has exactly one node (runs of skipped layers are split into
the longest allowed skips, left to right), and a child's path shares its parent's path up to
the new edit: prefix caching (radial.path_eval) only computes what follows the first change.
Paths longer than `max_length_factor * L` are not generated.

One simulation descends from the root, at each node taking a random legal edit with probability
`random_child`, else an untried edit if any is left (chosen at random), else the child with the
highest UCB  Q + c * sqrt(ln N_parent / N_child). The first new node reached is evaluated and its
reward  correct - length_penalty * len(path) / L  is backed up along the way. Rewards are
deterministic, so subtrees whose every path has been evaluated are marked exhausted and never
entered again: every simulation evaluates a path not seen before (the search ends early if the
whole space is exhausted). The default path is simulation 1. With `early_stop`, the search ends
as soon as a correct path beats the default: the default was wrong, or the correct path is at
least two layers shorter.

The label is the shortest correct path among all paths evaluated (ties: fewest distinct layers,
then the lexicographically smallest path); the default path when none was correct.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from radial import settings
from radial.routing import counts_to_path, dense_path
from radial.utils import RadialError

Evaluate = Callable[[tuple[int, ...]], bool]  # path -> is the example answered correctly along it


@dataclass(frozen=True)
class SearchSettings:
    """The search's settings; defaults are Dr.LLM's, the config schema's mcts.* keys."""

    simulations: int = settings.default_of("mcts.simulations")
    exploration: float = settings.default_of("mcts.exploration")
    length_penalty: float = settings.default_of("mcts.length_penalty")
    random_child: float = settings.default_of("mcts.random_child")
    max_skip: int = settings.default_of("mcts.max_skip")
    repeat: bool = settings.default_of("mcts.repeat")
    max_length_factor: float = settings.default_of("mcts.max_length_factor")
    early_stop: bool = settings.default_of("mcts.early_stop")

    def __post_init__(self) -> None:
        settings.check_fields(self, "mcts", "MCTS setting")


@dataclass(frozen=True)
class Edit:
    kind: str  # "skip" or "repeat"
    layer: int
    span: int = 1  # layers skipped


@dataclass
class SearchResult:
    path: tuple[int, ...]
    layer_labels: list[int]
    correct: bool
    default_correct: bool
    simulations: int
    paths_evaluated: int
    num_layers: int

    @property
    def layers_saved(self) -> int:
        return self.num_layers - len(self.path)


def path_key(path: Sequence[int]) -> tuple:
    """Order of preference among correct paths: shorter, then fewer distinct layers, then lexicographic."""
    return (len(path), len(set(path)), tuple(path))


@dataclass
class _Node:
    counts: tuple[int, ...]
    frontier: int  # first layer a further edit may touch
    after_single_skip: bool  # the last edit skipped exactly layer frontier-1 (then no skip may follow at once)
    parent: "_Node | None" = None
    children: dict[Edit, "_Node"] = field(default_factory=dict)
    untried: list[Edit] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    exhausted: bool = False  # every path in this subtree has been evaluated

    @property
    def path(self) -> tuple[int, ...]:
        return counts_to_path(self.counts)


class PathSearch:
    """MCTS over layer paths of an L-layer model for one example (`evaluate` gives correctness)."""

    def __init__(self, num_layers: int, settings: SearchSettings, evaluate: Evaluate, rng: random.Random):
        if num_layers < 1:
            raise RadialError("a model needs at least one layer to search paths")
        self.num_layers = num_layers
        self.settings = settings
        self.evaluate = evaluate
        self.rng = rng
        self.max_length = int(settings.max_length_factor * num_layers)

    # ----------------------------------------------------------------- tree
    def _new_node(self, counts: tuple[int, ...], frontier: int, after_single_skip: bool, parent) -> _Node:
        node = _Node(counts, frontier, after_single_skip, parent)
        node.edits = list(self._legal_edits(node))
        node.untried = list(node.edits)
        return node

    def _legal_edits(self, node: _Node) -> Iterator[Edit]:
        length = sum(node.counts)
        for layer in range(node.frontier, self.num_layers):
            skip_allowed = not (node.after_single_skip and layer == node.frontier)
            for span in range(1, self.settings.max_skip + 1):
                if skip_allowed and layer + span <= self.num_layers:
                    yield Edit("skip", layer, span)
            if self.settings.repeat and length + 1 <= self.max_length:
                yield Edit("repeat", layer)

    def _child(self, node: _Node, edit: Edit) -> _Node:
        counts = list(node.counts)
        if edit.kind == "skip":
            for layer in range(edit.layer, edit.layer + edit.span):
                counts[layer] = 0
            end = edit.layer + edit.span
            # A single skip directly after a shorter-than-maximal skip would split one run of
            # skipped layers in two ways; only the left-to-right longest split is generated.
            after_single_skip = edit.span < self.settings.max_skip
        else:
            counts[edit.layer] = 2
            end = edit.layer + 1
            after_single_skip = False
        child = self._new_node(tuple(counts), end, after_single_skip, node)
        node.children[edit] = child
        return child

    def _ucb(self, parent: _Node, child: _Node) -> float:
        return child.value_sum / child.visits + self.settings.exploration * math.sqrt(
            math.log(parent.visits) / child.visits
        )

    def _select(self, root: _Node) -> _Node:
        """Descend to a path not evaluated yet (the tree is not exhausted) and add its node."""
        node = root
        while True:
            open_edits = [e for e in node.edits if e not in node.children or not node.children[e].exhausted]
            if self.rng.random() < self.settings.random_child:
                edit = self.rng.choice(open_edits)
                if edit in node.untried:
                    node.untried.remove(edit)
            elif node.untried:
                edit = node.untried.pop(self.rng.randrange(len(node.untried)))
            else:
                edit = max(open_edits, key=lambda e: self._ucb(node, node.children[e]))
            child = node.children.get(edit)
            if child is None:
                return self._child(node, edit)
            node = child

    def _reward(self, path: tuple[int, ...], correct: bool) -> float:
        return float(correct) - self.settings.length_penalty * len(path) / self.num_layers

    # ----------------------------------------------------------------- search
    def run(self) -> SearchResult:
        L = self.num_layers
        root = self._new_node((1,) * L, 0, False, None)
        default_correct = bool(self.evaluate(dense_path(L)))
        correct_paths: set[tuple[int, ...]] = {dense_path(L)} if default_correct else set()
        evaluated = {dense_path(L)}
        self._backup(root, self._reward(dense_path(L), default_correct))
        simulations = 1
        while (
            simulations < self.settings.simulations
            and not root.exhausted
            and not self._done(default_correct, correct_paths)
        ):
            node = self._select(root)
            path = node.path
            correct = bool(self.evaluate(path))
            evaluated.add(path)
            if correct:
                correct_paths.add(path)
            self._backup(node, self._reward(path, correct))
            simulations += 1
        best = min(correct_paths, key=path_key) if correct_paths else dense_path(L)
        return SearchResult(
            path=best,
            layer_labels=path_counts(best, L),
            correct=bool(correct_paths),
            default_correct=default_correct,
            simulations=simulations,
            paths_evaluated=len(evaluated),
            num_layers=L,
        )

    def _done(self, default_correct: bool, correct_paths: set[tuple[int, ...]]) -> bool:
        if not self.settings.early_stop or not correct_paths:
            return False
        if not default_correct:
            return True
        return min(len(p) for p in correct_paths) <= self.num_layers - 2

    @staticmethod
    def _backup(node: _Node | None, reward: float) -> None:
        """Add the reward along the way up; mark subtrees whose every path is now evaluated."""
        while node is not None:
            node.visits += 1
            node.value_sum += reward
            node.exhausted = not node.untried and all(child.exhausted for child in node.children.values())
            node = node.parent


def path_counts(path: Sequence[int], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for layer in path:
        counts[layer] += 1
    return counts


def search(num_layers: int, settings: SearchSettings, evaluate: Evaluate, rng: random.Random) -> SearchResult:
    return PathSearch(num_layers, settings, evaluate, rng).run()


def all_paths(num_layers: int, settings: SearchSettings) -> Iterator[tuple[int, ...]]:
    """Every path of the search space: every node of the edit tree, each once (depth first)."""
    tree = PathSearch(num_layers, settings, lambda path: False, random.Random(0))
    stack = [tree._new_node((1,) * num_layers, 0, False, None)]
    while stack:
        node = stack.pop()
        yield node.path
        stack.extend(tree._child(node, edit) for edit in node.edits)


def brute_force(num_layers: int, settings: SearchSettings, evaluate: Evaluate) -> tuple[int, ...] | None:
    """The preferred correct path over the whole search space (None when no path is correct)."""
    correct = [path for path in all_paths(num_layers, settings) if evaluate(path)]
    return min(correct, key=path_key) if correct else None
