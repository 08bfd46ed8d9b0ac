"""Evaluate one model variant on one or more tasks with the stock lm-evaluation-harness.

    python -m radial evaluate --model DIR --variant NAME --task TASK --data-dir DATA --out FILE.json
    python -m radial evaluate --model DIR --variant NAME --task arc_easy mmlu synthetic \
        --limit 100 --limit-per-task mmlu=5 --data-dir DATA --out 'results/embedded/eval/NAME/{task}.json'

Several tasks run one after the other in one process, on the model loaded once; each writes its
own JSON (the `{task}` of --out), exactly as if evaluated alone (the seed is set again per task).
`--skip-bias` evaluates a routed model at another point of its compute knob without retraining:
it is added to the skip logits of Dr.LLM routers and subtracted from the logits of token gates
(positive: fewer layers), over the bias the model was saved with.

The model is loaded once with transformers and handed to lm-eval as an already-built model
(`HFLM(pretrained=model)`), so a routed or pruned model is evaluated through its own forward,
in generation too. Tasks are radial's lm-eval YAMLs over the normalized data (see
radial.eval_tasks); `lm_eval --include_path` on the same YAMLs gives the same numbers.

Besides lm-eval's metrics we record how deep the model actually ran: the mean number of decoder
layers executed per model forward, counted with hooks on the decoder layers (a dense model runs
all of them), or reported by the model itself through `radial_executed_layers()`. And how long it
took: the wall time of the whole evaluation, and the time spent inside the model's forward calls
with the tokens they processed, from which the report computes speedups.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radial import eval_tasks, settings
from radial.utils import RadialError, seed_everything, write_json


@dataclass(frozen=True)
class TaskSpec:
    lm_eval_name: str  # task or group name in radial's lm-eval YAMLs
    metric: str  # headline metric as lm-eval keys it: "<metric>,<filter>"
    generates: bool  # generate_until (needs room for max_gen_toks in the context window)


TASK_SPECS = {
    "arc_easy": TaskSpec("radial_arc_easy", "acc,none", False),
    "arc_challenge": TaskSpec("radial_arc_challenge", "acc,none", False),
    "gsm8k": TaskSpec("radial_gsm8k", "exact_match,flexible-extract", True),
    "mmlu": TaskSpec("radial_mmlu", "acc,none", False),
    "synthetic": TaskSpec("radial_synthetic", "exact_match,none", True),
}
LM_EVAL_DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks
_SAMPLE_KEYS = ("doc_id", "filter", "prompt_hash", "target", "resps", "filtered_resps")  # kept by --log-samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_path_argument(parser, "model")
    parser.add_argument("--variant", required=True, help="name of the model variant, e.g. dense, routed, shortgpt")
    parser.add_argument(
        "--task", required=True, nargs="+",
        help=f"tasks to evaluate on (model loaded once): radial's own ({', '.join(TASK_SPECS)}, data from --data-dir) "
        "or any lm-eval task or group name",
    )
    settings.add_path_argument(parser, "data_dir", required=False)
    settings.add_setting(parser, "evaluate.include_path", metavar="DIR")
    settings.add_path_argument(parser, "out", "evaluation JSON to write; with several tasks a path holding {task}")
    settings.add_setting(parser, "evaluate.limit")
    parser.add_argument(
        "--limit-per-task", nargs="+", default=[], metavar="TASK=N",
        help="config key evaluate.limit_per_task: --limit for single tasks",
    )
    parser.add_argument(
        "--num-fewshot", nargs="+", default=[], metavar="N|TASK=N",
        help="few-shot examples, for every task or per task (default: config key evaluate.num_fewshot.<task>)",
    )
    parser.add_argument(
        "--skip-bias", type=float, default=None,
        help="routed models: shift the skip decisions by this much (positive: fewer layers) over the saved bias",
    )
    settings.add_setting(parser, "evaluate.batch_size")
    settings.add_device_argument(parser, "evaluate.device")
    settings.add_setting(parser, "evaluate.max_gen_toks")
    parser.add_argument(
        "--log-samples", action="store_true", help="also store each example's prompt hash, responses and score"
    )
    parser.add_argument(
        "--reference-model",
        type=Path,
        default=None,
        help="model to time this one against (the dense model); its speedup is measured in this process",
    )
    for name in ("timing", "timing_repeats", "timing_seconds", "timing_batches", "timing_decode_steps"):
        settings.add_setting(parser, f"evaluate.{name}")
    settings.add_common_arguments(parser)


TIMING_LOCK = "radial-evaluate-timing.lock"
MAX_ROUNDS_PER_REPEAT = 5  # --timing-seconds adds rounds up to this many times --timing-repeats


@contextlib.contextmanager
def exclusive_timing(enabled: bool):
    """With `--timing exclusive`, one timed evaluation at a time on this machine, whichever snakemake (or
    shell) started it: a lock file in the temp folder ($RADIAL_TIMING_LOCK overrides), held for the
    whole evaluation. A second one waits, and says whom for."""
    if not enabled:
        yield
        return
    import fcntl

    path = Path(os.environ.get("RADIAL_TIMING_LOCK") or Path(tempfile.gettempdir()) / TIMING_LOCK)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            print(f"waiting for the evaluation holding {path} ({holder}) to finish: timings are taken alone", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(args: argparse.Namespace) -> int:
    from radial import tracking

    tasks = list(dict.fromkeys(args.task))
    args.include_path = [Path(path) for path in args.include_path or []]
    limits = _task_values("--limit-per-task", args.limit_per_task, tasks)
    fewshots = _task_values("--num-fewshot", args.num_fewshot, tasks, allow_all=True)
    plans = [task_arguments(args, task, len(tasks), limits, fewshots) for task in tasks]
    own = [task for task in tasks if task in TASK_SPECS]
    if own and args.data_dir is None:
        raise RadialError(f"--data-dir: radial's own tasks ({', '.join(own)}) read their data from the data stage's folder")
    eval_tasks.check_external_tasks(tasks, args.include_path, key="--task", path_key="--include-path")  # before a long model load
    timed = args.reference_model is not None and args.timing == "exclusive"
    with exclusive_timing(timed), tracking.stage_run("evaluate", args) as run, \
            tempfile.TemporaryDirectory(prefix="radial-tasks-") as tasks_dir:  # fmt: skip
        if own:
            eval_tasks.materialize(args.data_dir, tasks_dir, own)  # bad data fails before a long model load
        model, tokenizer = load_model(args.model, args.device)
        if args.skip_bias is not None:
            shift_skip_bias(model, args.skip_bias)
        references: dict = {}
        for task_args in plans:
            evaluation = evaluate_task(model, tokenizer, task_args, tasks_dir, references)
            metrics = {
                "accuracy": evaluation["accuracy"],
                "avg_executed_layers": evaluation["avg_executed_layers"],
                "wall_time_s": evaluation["wall_time_s"],
                "forward_time_s": evaluation["forward_time_s"],
                "n_examples": evaluation["n_examples"],
            }
            if "timing" in evaluation:
                metrics["speedup_vs_reference"] = evaluation["timing"]["speedup"]
            metrics |= {f"subtasks/{name}": value for name, value in evaluation["subtasks"].items()}
            metrics = {f"{task_args.task}/{key}": value for key, value in metrics.items()}
            run.log(metrics)
            run.summary.update(metrics)
            tracking.log_artifact(run, f"evaluation-{args.variant}-{task_args.task}", "evaluation", [task_args.out])
    return 0


def task_arguments(
    args: argparse.Namespace, task: str, num_tasks: int, limits: dict[str | None, int], fewshots: dict[str | None, int]
) -> argparse.Namespace:
    """This task's arguments: its output file, its limit and its few-shot count (a task's own value
    over the value for every task, over the config default)."""
    out = str(args.out)
    if num_tasks > 1 and "{task}" not in out:
        raise RadialError(f"--out {out}: with several tasks, --out must hold {{task}} (e.g. results/eval/x/{{task}}.json)")
    limit = limits.get(task, args.limit)
    # radial's own tasks default to the config's count; any other task to its own YAML's (None)
    default_fewshot = settings.default(f"evaluate.num_fewshot.{task}") if task in TASK_SPECS else None
    fewshot = fewshots.get(task, fewshots.get(None, default_fewshot))
    if limit is not None and limit < 1:
        raise RadialError(f"--limit for {task}: {limit} is not a positive number of examples")
    if fewshot is not None and fewshot < 0:
        raise RadialError(f"--num-fewshot for {task}: {fewshot} is negative")
    return argparse.Namespace(**{**vars(args), "task": task, "limit": limit, "num_fewshot": fewshot,
                                 "out": Path(out.replace("{task}", task))})


def _task_values(flag: str, entries: list[str], tasks: list[str], allow_all: bool = False) -> dict[str | None, int]:
    """["mmlu=5", "gsm8k=50"] -> {"mmlu": 5, "gsm8k": 50}; a bare "3" (allow_all) -> {None: 3}."""
    values: dict[str | None, int] = {}
    for entry in entries:
        task, _, number = entry.rpartition("=")
        if not task and not allow_all:
            raise RadialError(f"{flag} {entry}: expected TASK=N")
        if task and task not in tasks:
            raise RadialError(f"{flag} {entry}: {task!r} is not among the tasks evaluated ({', '.join(tasks)})")
        try:
            values[task or None] = int(number)
        except ValueError:
            raise RadialError(f"{flag} {entry}: {number!r} is not a whole number") from None
    return values


def evaluate_task(model, tokenizer, args: argparse.Namespace, tasks_dir: str, references: dict) -> dict[str, Any]:
    """Evaluate one task (args.task) on the loaded model, write its JSON and return it."""
    seed_everything(args.seed)  # as if the task ran alone
    if callable(getattr(model, "reset_layer_counter", None)):
        model.reset_layer_counter()
    gen_kwargs = generation_overrides(args.task, args.max_gen_toks, _context_length(model, tokenizer))
    with LayerCounter(model, record_batches=args.timing_batches) as counter:
        start = time.perf_counter()
        results = run_lm_eval(
            model,
            tokenizer,
            eval_tasks.evaluated_name(args.task),
            tasks_dir,
            include_paths=args.include_path,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            gen_kwargs=gen_kwargs,
            seed=args.seed,
            log_samples=args.log_samples,
        )
        wall_time_s = time.perf_counter() - start
    spec = task_spec(args.task, results)
    evaluation = summarize(results, spec, args, model, counter, wall_time_s)
    if args.reference_model is not None:
        evaluation["timing"] = paired_timing(model, args, spec.generates, counter.recorded, tokenizer, references)
    write_json(args.out, evaluation)
    print(
        f"{args.variant} on {args.task}: {evaluation['metric']} = {evaluation['accuracy']:.4f} "
        f"({evaluation['n_examples']} examples, {wall_time_s:.1f} s, of which model forwards "
        f"{evaluation['forward_time_s']:.1f} s over {evaluation['forward_tokens']} tokens)"
        + (f"; {evaluation['timing']['speedup']:.2f}x the reference" if "timing" in evaluation else ""),
        flush=True,
    )
    return evaluation


def shift_skip_bias(model, shift: float) -> None:
    """Move a routed model along its compute knob: skip_bias += shift (positive: fewer layers)."""
    from dataclasses import replace

    mode = getattr(getattr(model, "config", None), "routing_mode", None)
    if mode not in ("router", "token") or not hasattr(model, "budget"):
        raise RadialError(f"--skip-bias: the model is not routed by a router or token gates (routing mode {mode!r})")
    model.set_budget(replace(model.budget, skip_bias=model.budget.skip_bias + shift))


def load_model(model_dir: Path, device: str = "cpu"):
    """The model (float32, eval mode, on `device`) and its tokenizer from a saved HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import radial.routing  # noqa: F401  (registers routed model folders with AutoModelForCausalLM)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RadialError(f"model folder {model_dir} not found or has no config.json")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise RadialError(f"{model_dir}: the tokenizer has no eos token, which lm-eval needs to stop generation")
    return model, tokenizer


def task_spec(task: str, results: dict[str, Any]) -> TaskSpec:
    """radial's spec of one of its own tasks; for any other, the headline metric its lm-eval config names.

    That is the first metric of the task's metric_list (of its first task, for a group: the group's
    aggregate of it) under the first of its filters ("none" without filters), as lm-eval reports it.
    """
    if task in TASK_SPECS:
        return TASK_SPECS[task]
    configs = results.get("configs", {})
    leaves = [leaf for leaf in results.get("n-samples", {}) if leaf in configs]
    scores = results.get("results", {}).get(task, {})
    if not leaves:
        raise RadialError(f"lm-eval evaluated no task for {task!r}")
    first = configs[leaves[0]]
    metric = (first.get("metric_list") or [{}])[0].get("metric")
    filters = [f["name"] for f in first.get("filter_list") or [] if isinstance(f, dict) and "name" in f] or ["none"]
    candidates = [f"{metric},{name}" for name in filters]
    candidates += [key for key in scores if "," in key and "_stderr" not in key and key.startswith(f"{metric},")]
    candidates += [key for key in scores if "," in key and "_stderr" not in key]
    headline = next((key for key in candidates if isinstance(scores.get(key), (int, float))), None)
    if headline is None:
        raise RadialError(
            f"{task}: lm-eval reported no score for it (a group needs an aggregate_metric_list); name its tasks instead"
        )
    generates = any(configs[leaf].get("output_type") == "generate_until" for leaf in leaves)
    return TaskSpec(task, headline, generates)


def generation_overrides(task: str, max_gen_toks: int | None, context_length: int) -> dict[str, Any] | None:
    """lm-eval `gen_kwargs` for --max-gen-toks; a clear error where lm-eval's would be an assert.

    lm-eval applies them to generation tasks only, so any other task gets them as they are."""
    if task not in TASK_SPECS:
        return None if max_gen_toks is None else {"max_gen_toks": max_gen_toks}
    if not TASK_SPECS[task].generates:
        return None
    if max_gen_toks is not None:
        requested = max_gen_toks
    else:
        template = eval_tasks.load_template(task)
        requested = template.get("generation_kwargs", {}).get("max_gen_toks", LM_EVAL_DEFAULT_MAX_GEN_TOKS)
    if requested >= context_length:
        raise RadialError(
            f"the model's context is {context_length} tokens, too short to generate {requested} tokens "
            f"for {task}: pass --max-gen-toks below {context_length}"
        )
    return None if max_gen_toks is None else {"max_gen_toks": max_gen_toks}


def run_lm_eval(
    model,
    tokenizer,
    lm_eval_task: str,
    tasks_dir: str | Path,
    *,
    include_paths: list[Path] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    gen_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on a loaded model over the materialized tasks in `tasks_dir`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm_class = masked_hflm(HFLM) if routes_on_the_input(model) else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # radial's own YAMLs stand alone: lm-eval's thousands of built-in task files are indexed only for other tasks.
    task_manager = eval_tasks.task_manager(lm_eval_task, tasks_dir, include_paths)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[lm_eval_task],
        task_manager=task_manager,
        num_fewshot=num_fewshot,
        limit=limit,
        gen_kwargs=gen_kwargs,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results["unmasked_rows"] = getattr(lm, "unmasked_rows", 0)
    return results


def routes_on_the_input(model) -> bool:
    """A model whose routing reads its input (token routers, example routers, confidence exits): it
    must see which tokens are padding. Any other causal model computes its real tokens' logits the
    same with or without the mask of a right-padded batch, so lm-eval calls it as it always does."""
    return getattr(getattr(model, "config", None), "routing_mode", None) in ("token", "router")


def masked_hflm(hflm_class):
    """lm-eval's HFLM, but its loglikelihood batches reach the model with their attention mask.

    HFLM right-pads a loglikelihood batch and calls the model without a mask: harmless for a causal
    model's real tokens, but a routed model would route, run and count the padding. This
    subclass knows each request's input (context + continuation, as HFLM builds it), recognises
    every padded row by its tokens, and passes the mask of its real tokens, and the mask of its
    context as `decision_mask`: an example-level router (Dr.LLM routers, the confidence exit)
    decides from the question alone, so every answer choice of a question runs one path, the path
    the question gets at any batch size. Scoring is lm-eval's own. Rows it cannot recognise (none
    in our tests) run unmasked and are counted in `unmasked_rows`.
    """

    class MaskedHFLM(hflm_class):
        unmasked_rows = 0
        _inputs_by_length: dict[int, dict[tuple[int, ...], int]] | None = None

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            self._inputs_by_length = {}
            for _, context_enc, continuation_enc in requests:
                inp = tuple((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])
                context_length = max(1, len(inp) - (len(continuation_enc) - 1))
                self._inputs_by_length.setdefault(len(inp), {})[inp] = context_length
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._inputs_by_length = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None or not self._inputs_by_length:
                return super()._model_call(inps, attn_mask, labels)
            import torch

            masks = real_token_masks(inps, self._inputs_by_length)
            if masks is None:
                self.unmasked_rows += len(inps)
                return super()._model_call(inps)
            autocast = torch.autocast(
                device_type=self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None
            )
            with torch.no_grad(), autocast:
                return self.model(inps, attention_mask=masks[0], decision_mask=masks[1]).logits

    return MaskedHFLM


def real_token_masks(inps, inputs_by_length: dict[int, dict[tuple[int, ...], int]]):
    """(attention mask, context mask) of a right-padded batch whose rows are known inputs; None if a row is not."""
    import torch

    mask, context = torch.zeros_like(inps), torch.zeros_like(inps)
    for row, tokens in enumerate(inps.tolist()):
        nonzero = [i for i, token in enumerate(tokens) if token != 0]
        shortest = nonzero[-1] + 1 if nonzero else 1  # padding is token 0 (lm-eval's pad_and_concat)
        length = next(
            (n for n in range(shortest, len(tokens) + 1) if tuple(tokens[:n]) in inputs_by_length.get(n, ())), None
        )
        if length is None:
            return None
        mask[row, :length] = 1
        context[row, : inputs_by_length[length][tuple(tokens[:length])]] = 1
    return mask, context


class LayerCounter:
    """Counts decoder-layer executions per model forward, and clocks the forwards, while active.

    Forward pre-hooks on the model and on each decoder layer; a layer a routed model skips is
    not called, one it repeats is called twice. Models that count for themselves (routed models)
    expose `radial_executed_layers()` instead, which `average_executed_layers` prefers.

    The clock covers the model's forward calls only (prefill, every decoding step, every
    loglikelihood batch) and counts the tokens they processed, padding included. lm-eval's own
    work around them (building requests, loading and caching datasets, stop-sequence checks) is
    left out: it does not depend on the depth and would otherwise dilute or skew the speedups.
    """

    def __init__(self, model, record_batches: int = 0) -> None:
        from radial.layers import find_decoder_layers

        self.model = model
        self.record_batches = record_batches
        self.recorded: list[dict[str, Any]] = []  # the first `record_batches` fresh inputs, for paired timing
        self.layers = find_decoder_layers(model)
        self.forward_calls = 0
        self.layer_calls = 0
        self.forward_seconds = 0.0
        self.forward_tokens = 0
        self._handles: list = []
        self._started: float | None = None
        self._device = None
        self._depth = 0  # a forward that calls the model again inside is timed once

    def __enter__(self) -> "LayerCounter":
        self._handles.append(self.model.register_forward_pre_hook(self._start_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end_forward, always_call=True))
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._count_layer))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _start_forward(self, module, args, kwargs) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self.forward_calls += 1
        tokens = args[0] if args else kwargs.get("input_ids")
        if tokens is not None and len(self.recorded) < self.record_batches and _starts_a_sequence(kwargs):
            self.recorded.append(
                {"input_ids": tokens.detach().clone()}
                | {key: _cloned(kwargs.get(key)) for key in ("attention_mask", "decision_mask")}
            )
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is not None:
            self.forward_tokens += int(tokens.shape[0] * tokens.shape[1])
            self._device = tokens.device
            _synchronize(self._device)
        self._started = time.perf_counter()

    def _end_forward(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth > 0 or self._started is None:
            return
        _synchronize(self._device)
        self.forward_seconds += time.perf_counter() - self._started
        self._started = None

    def _count_layer(self, module, args) -> None:
        self.layer_calls += 1

    @property
    def mean_layers_per_forward(self) -> float:
        return self.layer_calls / self.forward_calls if self.forward_calls else float("nan")


def _cloned(tensor):
    return None if tensor is None else tensor.detach().clone()


def _starts_a_sequence(kwargs: dict[str, Any]) -> bool:
    """A loglikelihood batch or a generation's prefill: no cache yet, or an empty one."""
    cache = kwargs.get("past_key_values")
    return cache is None or cache.get_seq_length() == 0


def paired_timing(
    model, args: argparse.Namespace, generates: bool, batches: list[dict], tokenizer, references: dict | None = None
) -> dict[str, Any]:
    """Time `model` against the reference model on the same lm-eval batches, alternating, in this process.

    Separate processes differ by 10-30 % on the same model at the embedded model's size (thread
    placement, caches, clock), more than many of the differences to measure. Here both models
    replay the first recorded batches of this evaluation, as lm-eval ran them: one forward per
    loglikelihood batch; `generate` with a fixed number of new tokens per generation batch (so
    both produce the same tokens' worth of work). Each round times the reference and the model
    in the order reference, model, model, reference, so neither gains from going first or last
    (plain alternation put the same model at 1.08x itself). Rounds go on past --timing-repeats while
    the model's replays add up to less than --timing-seconds (a short batch gets more rounds). The
    speedup is the median of the rounds' ratios: the same model timed against itself this way
    stays within about 3-6 % of 1 on a quiet 2-core machine.
    """
    import torch

    from radial.routing.flops import Shape, ideal_speedup

    if not batches:
        raise RadialError("lm-eval ran no batches to time against the reference model")
    same = Path(args.reference_model).resolve() == Path(args.model).resolve() and args.skip_bias is None
    references = {} if references is None else references  # loaded once per process
    if not same and args.reference_model not in references:
        references[args.reference_model] = load_model(args.reference_model, args.device)[0]
    reference = model if same else references[args.reference_model]

    def replay(which) -> float:
        _synchronize(torch.device(args.device))
        start = time.perf_counter()
        for batch in batches:
            if generates:
                which.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=args.timing_decode_steps,
                    min_new_tokens=args.timing_decode_steps,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                )
            elif routes_on_the_input(which):  # each model as lm-eval called it
                which(**batch)
            else:
                which(input_ids=batch["input_ids"])
        _synchronize(torch.device(args.device))
        return time.perf_counter() - start

    seconds = {"model": [], "reference": []}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        ideal = None
        if callable(getattr(model, "recording_token_runs", None)) and _token_execution(model):
            with model.recording_token_runs() as forwards:  # the warm-up, counted
                replay(model)
            ideal = ideal_speedup(Shape.of(model.text_config), forwards, model.config.token_skip)
        else:
            replay(model)
        replay(reference)
        rounds, most_rounds = 0, args.timing_repeats * MAX_ROUNDS_PER_REPEAT
        while rounds < args.timing_repeats or (sum(seconds["model"]) < args.timing_seconds and rounds < most_rounds):
            seconds["reference"].append(replay(reference))
            seconds["model"] += [replay(model), replay(model)]
            seconds["reference"].append(replay(reference))
            rounds += 1
    pairs = list(zip(seconds["reference"][0::2], seconds["reference"][1::2], seconds["model"][0::2], seconds["model"][1::2]))
    round_ratios = [(r1 + r2) / (m1 + m2) for r1, r2, m1, m2 in pairs]
    positions = sum(int(batch["input_ids"].numel()) for batch in batches)
    masks = [batch["attention_mask"] for batch in batches if batch.get("attention_mask") is not None]
    padding = sum(int((mask == 0).sum()) for mask in masks)
    return {
        "reference": str(args.reference_model),
        "speedup": statistics.median(round_ratios),
        # Token-routed models: dense FLOPs over the FLOPs their routing left on these batches
        # (radial.routing.flops); the speedup a perfectly efficient sparse execution would reach.
        "ideal_speedup": ideal,
        "round_ratios": round_ratios,
        "model_s": seconds["model"],
        "reference_s": seconds["reference"],
        "batches": len(batches),
        "tokens": positions,
        # The dense reference computes these padding tokens; token routing drops them, and the ideal
        # leaves them out on both sides: a padded batch's speedup holds a saving no router decided.
        "padding_share": padding / positions,
        "decode_steps": args.timing_decode_steps if generates else 0,
        "repeats": rounds,
        # The machine's 1-minute load average before and after the rounds, against this process's threads:
        # well above them (by more than 1.5: the average lags a job that just ended), something else ran.
        "load_average": [load_before, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "contended": max(load_before, os.getloadavg()[0]) > torch.get_num_threads() + 1.5,
    }


def _synchronize(device) -> None:
    """Wait for queued GPU work, so the clock measures the work and not its launch."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _token_execution(model) -> str | None:
    config = getattr(model, "config", None)
    if getattr(config, "routing_mode", None) != "token":
        return None
    skip = getattr(config, "token_skip", "layer")
    return f"{model.token_execution} (skip: {skip})"


def average_executed_layers(model, counter: LayerCounter) -> float:
    """Mean decoder layers executed per forward: the model's own count if it keeps one, else the hooks'."""
    if callable(getattr(model, "radial_executed_layers", None)):
        return float(model.radial_executed_layers())
    return counter.mean_layers_per_forward


def summarize(
    results: dict[str, Any], spec: TaskSpec, args: argparse.Namespace, model, counter: LayerCounter, wall_time_s: float
) -> dict[str, Any]:
    """The evaluation record written to --out."""
    headline = results["results"][spec.lm_eval_name]
    metric, metric_filter = spec.metric.split(",")
    leaf_tasks = list(results["n-samples"])
    subtasks = {}
    if leaf_tasks != [spec.lm_eval_name]:  # mmlu subjects, synthetic levels
        prefix = spec.lm_eval_name + "_"
        subtasks = {name.removeprefix(prefix): results["results"][name][spec.metric] for name in sorted(leaf_tasks)}
    evaluation = {
        "variant": args.variant,
        "task": args.task,
        "model": str(args.model),
        "metric": metric if metric_filter == "none" else spec.metric,
        "accuracy": float(headline[spec.metric]),
        "accuracy_stderr": _finite_or_none(headline.get(f"{metric}_stderr,{metric_filter}")),
        "avg_executed_layers": average_executed_layers(model, counter),
        # How a token-routed model ran: "sparse" (only running tokens computed), or the reference
        # (every token computed, then selected) and why; None for models that route no tokens.
        "token_execution": _token_execution(model),
        "unmasked_loglikelihood_rows": results.get("unmasked_rows", 0),
        "num_layers": len(counter.layers),
        "wall_time_s": wall_time_s,
        "forward_time_s": counter.forward_seconds,
        "forward_tokens": counter.forward_tokens,
        "n_examples": sum(int(n["effective"]) for n in results["n-samples"].values()),
        "num_fewshot": results.get("n-shot", {}).get(leaf_tasks[0]),
        "limit": args.limit,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "subtasks": subtasks,
        "lm_eval": _jsonable({key: results.get(key, {}) for key in ("results", "groups", "n-samples", "configs")}),
    }
    if "samples" in results:
        evaluation["samples"] = _jsonable(
            {
                task: [
                    {key: sample[key] for key in _SAMPLE_KEYS} | {m: sample[m] for m in sample["metrics"]}
                    for sample in samples
                ]
                for task, samples in results["samples"].items()
            }
        )
    return evaluation


def _context_length(model, tokenizer) -> int:
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(model.config, tokenizer)


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where it has no stderr
    return value if math.isfinite(value) else None


_DROP = object()


def _jsonable(obj: Any) -> Any:
    """Plain JSON values only: numpy scalars become numbers, NaN/inf become null, other objects are dropped."""
    if isinstance(obj, dict):
        items = ((str(k), _jsonable(v)) for k, v in obj.items())
        return {k: v for k, v in items if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        return [v for v in map(_jsonable, obj) if v is not _DROP]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy / torch scalars
        return _jsonable(obj.item())
    return _DROP
