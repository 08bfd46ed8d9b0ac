"""Is an example answered correctly along a given layer path? Answered with shared prefix work.

MCTS (radial.path_search) asks this for many paths of one example. Two paths that agree on their
first k layers compute the same hidden states and the same keys/values in those k layers, for
the prompt and for every generated token as long as the tokens generated so far agree too.
`PathEvaluator` keeps that work in a trie over path prefixes: node `path[:k]` holds, per *block*
of tokens (block 0 = the prompt, then one block per generated token or one per multiple-choice
continuation), the hidden states its last layer produced and the keys/values that layer wrote.
A new path resumes from the deepest node that already holds the block and runs only the layers
after it, attending to the keys/values the trie holds for the earlier blocks. That is the
per-(layer, occurrence) KV cache of radial.routing, keyed by path prefix instead of by one path.

The layers are the stock Hugging Face decoder layers, called with the masks and rotary
embeddings radial.routing builds for them (`Backbone.call_layer`, `attention_masks`), so a path's
logits are those of `RoutedForCausalLM` with that path (tests check this).

Cost is counted in *block evaluations*: one decoder layer applied to one block of one example
(the prompt, one decoding step, or one choice continuation). `layer_tokens` counts the tokens
those calls processed. With `share_prefixes=False` the trie is emptied before every path, which
is exactly a plain KV-cached greedy decode of that path: the naive baseline. Either way
`naive_block_evaluations` counts what the naive baseline spends on the same requests (every
layer of the path for every block asked for), so a prefix-shared run reports its own saving.

Rewards follow the lm-eval task YAMLs in radial/eval_tasks (prompt = the task's doc_to_text):
- synthetic: greedy generation until "\\n"; exact match of the text before it with `answer`.
  Generation stops as soon as that text can no longer equal the answer (the verdict is known).
- gsm8k: greedy generation until "Question:" (or EOS / the token budget); the last number in it
  (lm-eval's flexible-extract filter and its exact_match normalisation) against `answer`.
- arc_easy / arc_challenge: lm-eval's multiple-choice `acc`, i.e. the choice whose continuation
  " <choice>" has the highest log-likelihood must be the gold one (not a generated letter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from radial.routing import RoutedForCausalLM, attention_masks
from radial.utils import RadialError

Blocks = tuple[tuple[int, ...], ...]  # the blocks after the prompt, in order
GENERATION_TASKS = ("synthetic", "gsm8k")
CHOICE_TASKS = ("arc_easy", "arc_challenge")
SUPPORTED_TASKS = GENERATION_TASKS + CHOICE_TASKS


@dataclass
class _Entry:
    """What the last layer of one path prefix produced for one block."""

    hidden: torch.Tensor  # [1, q, d]
    keys: torch.Tensor | None  # [1, kv_heads, q, head_dim]; None at the root (embeddings only)
    values: torch.Tensor | None
    logits: torch.Tensor | None = None  # [q, vocab] once this prefix was read out as a whole path


class _Node:
    __slots__ = ("children", "entries")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.entries: dict[Blocks, _Entry] = {}


class _PastKV:
    """What one layer call sees as `past_key_values`: its slot's keys/values for the earlier blocks.

    The stock attention calls `update(key, value, layer_idx)` and attends to what it returns
    (past + new); the new block's part is kept in `new`. The mask functions ask the same object
    how many tokens come before the block.
    """

    is_compileable = False

    def __init__(self, past_length: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        self.past_length = past_length
        self.keys = keys
        self.values = values
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new = (key_states, value_states)
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.past_length + query_length, 0


class PathEvaluator:
    """Logits of one example's prompt (and continuation blocks) along any layer path, prefix-shared."""

    def __init__(self, routed: RoutedForCausalLM, prompt_ids: Sequence[int], *, share_prefixes: bool = True):
        if not prompt_ids:
            raise RadialError("cannot evaluate an empty prompt")
        self.routed = routed
        self.parts = routed.parts
        self.layer_types = routed.layer_types
        self.device = routed.parts.lm_head.weight.device
        self.prompt = tuple(int(t) for t in prompt_ids)
        self.share_prefixes = share_prefixes
        self.block_evaluations = 0
        self.naive_block_evaluations = 0
        self.layer_tokens = 0
        self._root = _Node()
        self._block_inputs: dict[tuple[int, int], tuple] = {}  # (past length, block length) -> inputs

    def start_path(self) -> None:
        """Called before each path; without prefix sharing it forgets everything (the naive baseline)."""
        if not self.share_prefixes:
            self._root = _Node()

    @torch.no_grad()
    def logits(self, path: Sequence[int], blocks: Blocks = ()) -> torch.Tensor:
        """[q, vocab] float logits of the last block (the prompt when `blocks` is empty) along `path`.

        Every earlier block must have been evaluated along the same path first (as decoding does).
        """
        nodes = [self._root]
        for layer in path:
            node = nodes[-1]
            child = node.children.get(layer)
            if child is None:
                child = node.children[layer] = _Node()
            nodes.append(child)
        entry = nodes[-1].entries.get(blocks)
        self.naive_block_evaluations += len(path)
        if entry is None or entry.logits is None:
            self._run(path, nodes, blocks)
            entry = nodes[-1].entries[blocks]
            entry.logits = self.parts.head(entry.hidden)[0].float()
        return entry.logits

    def _run(self, path: Sequence[int], nodes: list[_Node], blocks: Blocks) -> None:
        depth = 0  # how many nodes along the path already hold this block
        while depth < len(nodes) and blocks in nodes[depth].entries:
            depth += 1
        tokens = blocks[-1] if blocks else self.prompt
        past_length = len(self.prompt) + sum(len(block) for block in blocks[:-1]) if blocks else 0
        position_ids = torch.arange(past_length, past_length + len(tokens), device=self.device).unsqueeze(0)
        if depth == 0:
            ids = torch.tensor([tokens], device=self.device)
            self._root.entries[blocks] = _Entry(self.parts.embed(ids, None, position_ids), None, None)
            depth = 1
        hidden = nodes[depth - 1].entries[blocks].hidden
        position_embeddings, masks = self._inputs(past_length, hidden, position_ids)
        earlier = [blocks[:i] for i in range(len(blocks))]  # keys of the blocks before this one
        for node, layer in zip(nodes[depth:], path[depth - 1 :]):
            if earlier:
                past = [node.entries[key] for key in earlier]
                keys, values = torch.cat([e.keys for e in past], -2), torch.cat([e.values for e in past], -2)
                kv = _PastKV(past_length, keys, values)
            else:
                kv = _PastKV(0)
            hidden = self.parts.call_layer(
                self.parts.layers[layer],
                hidden,
                mask=masks[self.layer_types[layer]],
                position_ids=position_ids,
                position_embeddings=position_embeddings[self.layer_types[layer]],
                past_key_values=kv,
                use_cache=True,
            )
            node.entries[blocks] = _Entry(hidden, *kv.new)
            self.block_evaluations += 1
            self.layer_tokens += len(tokens)

    def _inputs(self, past_length: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        """Rotary embeddings (per attention type) and masks of a block (the same for every path)."""
        key = (past_length, hidden.shape[1])
        if key not in self._block_inputs:
            self._block_inputs[key] = (
                self.parts.position_embeddings(hidden, position_ids, self.layer_types),
                attention_masks(
                    self.routed.text_config, self.layer_types, hidden, None, _PastKV(past_length), position_ids
                ),
            )
        return self._block_inputs[key]


# ---------------------------------------------------------------------------------------------
# Rewards: is the example answered correctly along a path?


@dataclass(frozen=True)
class Outcome:
    correct: bool
    answer: str  # the generated answer text, or the chosen choice's label


class PathScorer:
    """`scorer(path) -> Outcome` for one example; memoised by path when prefixes are shared."""

    def __init__(self, evaluator: PathEvaluator) -> None:
        self.evaluator = evaluator
        self._memo: dict[tuple[int, ...], Outcome] = {}

    def __call__(self, path: Sequence[int]) -> Outcome:
        path = tuple(path)
        if self.evaluator.share_prefixes and path in self._memo:
            return self._memo[path]
        self.evaluator.start_path()
        outcome = self._score(path)
        self._memo[path] = outcome
        return outcome

    def _score(self, path: tuple[int, ...]) -> Outcome:
        raise NotImplementedError


class GreedyAnswerScorer(PathScorer):
    """Greedy decoding (batch 1, no padding, as lm-eval's generate_until) judged by `verdict`.

    `verdict(text)` returns True/False once the answer is decided, None while it is still open;
    decoding also ends at EOS or after `max_new_tokens`, where `final(text)` judges.
    """

    def __init__(
        self,
        evaluator: PathEvaluator,
        tokenizer: Any,
        verdict: Callable[[str], bool | None],
        final: Callable[[str], bool],
        max_new_tokens: int,
    ) -> None:
        super().__init__(evaluator)
        self.tokenizer = tokenizer
        self.verdict = verdict
        self.final = final
        self.max_new_tokens = max_new_tokens
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def _score(self, path: tuple[int, ...]) -> Outcome:
        generated: list[int] = []
        blocks: Blocks = ()
        text = ""
        for _ in range(self.max_new_tokens):
            token = int(self.evaluator.logits(path, blocks)[-1].argmax())
            if token in self.eos_ids:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            decided = self.verdict(text)
            if decided is not None:
                return Outcome(decided, text)
            blocks = blocks + ((token,),)
        return Outcome(self.final(text), text)


class ChoiceScorer(PathScorer):
    """lm-eval multiple choice `acc`: the highest-log-likelihood continuation must be the gold one."""

    def __init__(
        self, evaluator: PathEvaluator, continuations: Sequence[Sequence[int]], gold: int, labels: Sequence[str]
    ):
        super().__init__(evaluator)
        if not continuations or any(len(c) == 0 for c in continuations):
            raise RadialError("every choice needs at least one continuation token")
        self.continuations = [tuple(c) for c in continuations]
        self.gold = gold
        self.labels = list(labels)

    def _score(self, path: tuple[int, ...]) -> Outcome:
        prompt_logprobs = torch.log_softmax(self.evaluator.logits(path)[-1], dim=-1)
        scores = []
        for continuation in self.continuations:
            score = prompt_logprobs[continuation[0]]
            if len(continuation) > 1:  # the continuation's own tokens predict its later tokens
                logprobs = torch.log_softmax(self.evaluator.logits(path, (continuation[:-1],)), dim=-1)
                targets = torch.tensor(continuation[1:], device=logprobs.device)[:, None]
                score = score + logprobs.gather(1, targets).sum()
            scores.append(float(score))
        choice = max(range(len(scores)), key=scores.__getitem__)  # first maximum, as numpy's argmax
        return Outcome(choice == self.gold, self.labels[choice])


# ---------------------------------------------------------------------------------------------
# Task-specific prompts and verdicts (mirroring radial/eval_tasks/*.yaml)


def render_prompt(task: str, row: dict) -> str:
    """The task's lm-eval doc_to_text applied to the row (zero-shot)."""
    import jinja2

    from radial.eval_tasks import load_template

    if task not in SUPPORTED_TASKS:
        raise RadialError(f"mcts supports tasks {', '.join(SUPPORTED_TASKS)}; got {task!r}")
    template = load_template(task)["doc_to_text"]
    return jinja2.Template(template, keep_trailing_newline=True).render(**row)


def synthetic_verdict(answer: str) -> Callable[[str], bool | None]:
    """Decided once a newline ends the answer line, or once the line can no longer become `answer`."""

    def verdict(text: str) -> bool | None:
        line, newline, _ = text.partition("\n")
        if newline:
            return line == answer
        return None if answer.startswith(line) else False

    return verdict


_GSM8K_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval gsm8k flexible-extract
_GSM8K_IGNORE = [re.compile(r) for r in (",", r"\$", r"(?s).*#### ", r"\.$")]
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")


def gsm8k_normalize(text: str) -> str:
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def gsm8k_final_number(text: str) -> str | None:
    """The last number in the text, as lm-eval's flexible-extract filter picks it."""
    matches = _GSM8K_NUMBER.findall(text)
    if not matches:
        return None
    groups = [group for group in matches[-1] if group]
    return groups[0].strip() if groups else None


def gsm8k_verdict(answer: str) -> tuple[Callable[[str], bool | None], Callable[[str], bool]]:
    gold = gsm8k_normalize(answer)

    def final(text: str) -> bool:
        for stop in GSM8K_STOP:
            text = text.split(stop)[0]
        number = gsm8k_final_number(text)
        return number is not None and gsm8k_normalize(number) == gold

    def verdict(text: str) -> bool | None:
        return final(text) if any(stop in text for stop in GSM8K_STOP) else None

    return verdict, final


def build_scorer(
    routed: RoutedForCausalLM,
    tokenizer: Any,
    task: str,
    row: dict,
    *,
    max_new_tokens: int,
    share_prefixes: bool = True,
) -> tuple[str, PathScorer]:
    """(prompt text, scorer) for one data row of `task`."""
    prompt = render_prompt(task, row)
    prompt_ids = tokenizer(prompt)["input_ids"]
    where = f"row {row.get('id', '?')}"
    if task in CHOICE_TASKS:
        choices, gold = row.get("choices"), row.get("answer")
        if not choices or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise RadialError(f"{where}: needs 'choices' and an integer 'answer' index into them")
        # lm-eval's _encode_pair: encode context+continuation whole, split after the context's tokens
        continuations = [tokenizer(prompt + " " + str(choice))["input_ids"][len(prompt_ids) :] for choice in choices]
        labels = row.get("labels") or [chr(ord("A") + i) for i in range(len(choices))]
        evaluator = PathEvaluator(routed, prompt_ids, share_prefixes=share_prefixes)
        return prompt, ChoiceScorer(evaluator, continuations, gold, labels)
    if "answer" not in row:
        raise RadialError(f"{where}: has no 'answer'")
    answer = str(row["answer"])
    evaluator = PathEvaluator(routed, prompt_ids, share_prefixes=share_prefixes)
    if task == "synthetic":
        verdict = synthetic_verdict(answer)
        final = lambda text: text.partition("\n")[0] == answer  # noqa: E731 (budget exhausted: judge the line)
    else:
        verdict, final = gsm8k_verdict(answer)
    return prompt, GreedyAnswerScorer(evaluator, tokenizer, verdict, final, max_new_tokens)
