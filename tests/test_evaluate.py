"""The evaluation stage: radial's lm-eval task YAMLs and `python -m radial evaluate`.

The data stage is tested elsewhere; here a few rows of the real benchmark files are converted
to the shared normalized schema by a few lines of test code, so these tests depend only on the
schema. The key test checks that our Python path gives exactly the numbers (and per-example
responses) of the plain `lm_eval` command line on the same model folder and task files.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from radial import eval_tasks, settings
from radial.__main__ import main as radial_main
from radial.utils import RadialError, read_jsonl, write_jsonl

ROWS = 12
# Two categories (stem, humanities) and unequal sizes, so weighting by size matters.
MMLU_TEST_ROWS = {"abstract_algebra": 12, "anatomy": 9, "world_religions": 5}
MMLU_SUBJECTS = tuple(MMLU_TEST_ROWS)


# ---------------------------------------------------------------- normalized test data


def _arc_rows(csv_path: Path, task: str, split: str) -> list[dict]:
    rows = []
    with open(csv_path, newline="") as f:
        for record in csv.DictReader(f):
            # AI2's CSV writes the choices inline: "stem (A) first (B) second ..."
            parts = re.split(r"\s*\(([A-E1-5])\)\s+", record["question"])
            labels, texts = parts[1::2], parts[2::2]
            rows.append(
                {"id": record["questionID"], "task": task, "split": split, "question": parts[0],
                 "choices": texts, "labels": labels, "answer": labels.index(record["AnswerKey"])}
            )
            if len(rows) == ROWS:
                return rows
    return rows


def _gsm8k_rows(jsonl_path: Path, split: str) -> list[dict]:
    rows = []
    for i, record in enumerate(read_jsonl(jsonl_path)[:ROWS]):
        rows.append(
            {"id": f"gsm8k-{split}-{i}", "task": "gsm8k", "split": split, "question": record["question"],
             "choices": [], "labels": [], "answer": record["answer"].split("####")[-1].strip(),
             "solution": record["answer"]}
        )
    return rows


def _mmlu_rows(mmlu_dir: Path, split: str) -> list[dict]:
    rows = []
    for subject in MMLU_SUBJECTS:
        with open(mmlu_dir / split / f"{subject}_{split}.csv", newline="") as f:
            rows_wanted = MMLU_TEST_ROWS[subject] if split == "test" else 5
            for i, record in enumerate(list(csv.DictReader(f))[:rows_wanted]):
                rows.append(
                    {"id": f"{subject}-{split}-{i}", "task": "mmlu", "split": split, "question": record["question"],
                     "choices": [record[f"choice{k}"] for k in range(4)], "labels": list("ABCD"),
                     "answer": int(record["answer"]), "subject": subject}
                )
    return rows


def _synthetic_rows(split: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for level in range(1, 6):
        for i in range(ROWS):
            expression = str(rng.randint(0, 9)) + "".join(
                rng.choice("+-") + str(rng.randint(0, 9)) for _ in range(level)
            )
            rows.append(
                {"id": f"synthetic-{split}-{level}-{i}", "task": "synthetic", "split": split,
                 "question": expression + "=", "choices": [], "labels": [], "answer": str(eval(expression)),
                 "level": level}
            )
    return rows


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, shared_data) -> Path:
    """A small normalized data folder in the shared schema, from the real benchmark files."""
    out = tmp_path_factory.mktemp("normalized")
    for task, name in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        for split, source in (("train", "Train"), ("validation", "Dev"), ("test", "Test")):
            rows = _arc_rows(shared_data / "arc" / f"{name}-{source}.csv", task, split)
            write_jsonl(out / task / f"{split}.jsonl", rows)
    for split in ("train", "test"):
        write_jsonl(out / "gsm8k" / f"{split}.jsonl", _gsm8k_rows(shared_data / "gsm8k" / f"{split}.jsonl", split))
        write_jsonl(out / "synthetic" / f"{split}.jsonl", _synthetic_rows(split, seed=len(split)))
    for split in ("dev", "test"):
        write_jsonl(out / "mmlu" / f"{split}.jsonl", _mmlu_rows(shared_data / "mmlu", split))
    return out


def _evaluate(model_dir: Path, data_dir: Path, task: str, out: Path, *extra: str) -> dict:
    argv = ["evaluate", "--model", str(model_dir), "--variant", "dense", "--task", task,
            "--data-dir", str(data_dir), "--out", str(out), *extra]  # fmt: skip
    assert radial_main(argv) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------- task YAMLs


def test_materialize_writes_tasks_lm_eval_can_load(data_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    out = eval_tasks.materialize(data_dir, tmp_path / "tasks", eval_tasks.TASKS)

    manager = TaskManager(include_path=str(out), include_defaults=False)
    subjects = [f"radial_mmlu_{s}" for s in MMLU_SUBJECTS]
    levels = [f"radial_synthetic_level{n}" for n in range(1, 6)]
    assert set(manager.all_subtasks) == {"radial_arc_easy", "radial_arc_challenge", "radial_gsm8k", *subjects, *levels}
    assert set(manager.all_groups) == {"radial_mmlu", "radial_mmlu_stem", "radial_mmlu_humanities", "radial_synthetic"}

    loaded = manager.load(["radial_mmlu"])
    assert sorted(loaded["tasks"]) == sorted(subjects)
    assert loaded["group_map"]["radial_mmlu_humanities"] == ["radial_mmlu_world_religions"]
    anatomy = loaded["tasks"]["radial_mmlu_anatomy"]
    assert len(anatomy.test_docs()) == 9 and {doc["subject"] for doc in anatomy.test_docs()} == {"anatomy"}
    assert anatomy.config.description == "The following are multiple choice questions (with answers) about anatomy.\n\n"

    for path in out.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        for data_file in config.get("dataset_kwargs", {}).get("data_files", {}).values():
            assert Path(data_file).is_absolute() and Path(data_file).is_file(), (path.name, data_file)


def test_synthetic_level_files_hold_only_their_level(data_dir, tmp_path):
    out = eval_tasks.materialize(data_dir, tmp_path, ["synthetic"])
    config = yaml.safe_load((out / "radial_synthetic_level3.yaml").read_text())
    for split, path in config["dataset_kwargs"]["data_files"].items():
        rows = read_jsonl(path)
        assert len(rows) == ROWS and {row["level"] for row in rows} == {3} and {row["split"] for row in rows} == {split}


def _builtin(relative: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    import lm_eval

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / relative, resolve_func=False)


@pytest.mark.parametrize(
    "template, builtin, same_keys",
    [
        ("arc_easy", "arc/arc_easy.yaml", ["output_type", "training_split", "validation_split", "test_split",
                                           "doc_to_text", "metric_list", "fewshot_split", "num_fewshot"]),
        ("arc_challenge", "arc/arc_challenge.yaml", ["output_type", "training_split", "validation_split",
                                                     "test_split", "doc_to_text", "metric_list"]),
        ("gsm8k", "gsm8k/gsm8k.yaml", ["output_type", "training_split", "fewshot_split", "test_split", "doc_to_text",
                                       "metric_list", "generation_kwargs", "repeats", "num_fewshot", "filter_list"]),
        ("mmlu", "mmlu/default/mmlu_anatomy.yaml", ["output_type", "test_split", "fewshot_split", "fewshot_config",
                                                    "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list"]),
    ],
)  # fmt: skip
def test_templates_mirror_lm_eval_builtin_tasks(template, builtin, same_keys):
    ours, theirs = eval_tasks.load_template(template), _builtin(builtin)
    for key in same_keys:
        assert ours.get(key) == theirs.get(key), key
    assert ours["dataset_path"] == "json"


def test_mmlu_subjects_come_from_lm_eval():
    subjects = eval_tasks.lm_eval_mmlu_subjects()
    assert len(subjects) == 57
    assert subjects["high_school_us_history"]["category"] == "humanities"
    assert subjects["college_physics"]["category"] == "stem"


def test_materialize_names_the_missing_file(tmp_path):
    with pytest.raises(RadialError, match=r"gsm8k/test\.jsonl not found"):
        eval_tasks.materialize(tmp_path / "nowhere", tmp_path / "tasks", ["gsm8k"])
    with pytest.raises(RadialError, match="unknown task"):
        eval_tasks.materialize(tmp_path, tmp_path / "tasks", ["hellaswag"])


def test_materialize_names_the_bad_row(tmp_path):
    rows = [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": "anatomy"}, {"question": "q"}]
    write_jsonl(tmp_path / "mmlu" / "test.jsonl", rows)
    write_jsonl(tmp_path / "mmlu" / "dev.jsonl", rows[:1])
    with pytest.raises(RadialError, match=r"test\.jsonl:2: missing key\(s\) choices, answer, subject"):
        eval_tasks.materialize(tmp_path, tmp_path / "tasks", ["mmlu"])


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "gsm8k", "mmlu", "synthetic"])
def test_evaluate_writes_the_evaluation(task, tiny_llama_dir, data_dir, tmp_path):
    result = _evaluate(tiny_llama_dir, data_dir, task, tmp_path / "eval.json", "--limit", "2", "--batch-size", "2",
                       "--max-gen-toks", "24")  # fmt: skip

    assert result["variant"] == "dense" and result["task"] == task and result["model"] == str(tiny_llama_dir)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["num_layers"] == 4 and result["avg_executed_layers"] == 4.0
    assert 0 < result["forward_time_s"] < result["wall_time_s"] and result["forward_tokens"] > 0
    metric_key = {"gsm8k": "exact_match,flexible-extract", "synthetic": "exact_match,none"}.get(task, "acc,none")
    assert result["metric"] == metric_key.removesuffix(",none")
    assert result["accuracy"] == result["lm_eval"]["results"][eval_tasks.lm_eval_name(task)][metric_key]
    expected_subtasks = {"mmlu": set(MMLU_SUBJECTS), "synthetic": {f"level{n}" for n in range(1, 6)}}.get(task, set())
    assert set(result["subtasks"]) == expected_subtasks
    assert all(0.0 <= value <= 1.0 for value in result["subtasks"].values())
    assert result["n_examples"] == 2 * max(1, len(expected_subtasks))
    assert result["num_fewshot"] == settings.default(f"evaluate.num_fewshot.{task}")  # the workflow's default
    assert "samples" not in result
    json.dumps(result, allow_nan=False)  # strict JSON throughout


@pytest.mark.parametrize("task", ["arc_easy", "synthetic"])
def test_paired_timing_replays_the_first_batches_against_the_reference(task, tiny_llama_dir, data_dir, tmp_path):
    import shutil

    reference = tmp_path / "reference"
    shutil.copytree(tiny_llama_dir, reference)  # a separate folder: loaded as a second model
    result = _evaluate(tiny_llama_dir, data_dir, task, tmp_path / "eval.json", "--limit", "3", "--batch-size", "2",
                       "--max-gen-toks", "8", "--reference-model", str(reference), "--timing-repeats", "3",
                       "--timing-seconds", "0", "--timing-batches", "2", "--timing-decode-steps", "5")  # fmt: skip

    timing = result["timing"]
    assert timing["reference"] == str(reference)
    assert timing["repeats"] == 3 and len(timing["round_ratios"]) == 3
    assert len(timing["model_s"]) == len(timing["reference_s"]) == 6  # reference, model, model, reference per round
    assert timing["speedup"] == pytest.approx(sorted(timing["round_ratios"])[1])  # the median round
    assert timing["batches"] == 2 and 0 < timing["tokens"] < result["forward_tokens"]
    assert 0 <= timing["padding_share"] < 1
    assert timing["decode_steps"] == (5 if task == "synthetic" else 0)
    assert all(seconds > 0 for seconds in timing["model_s"] + timing["reference_s"])
    assert timing["ideal_speedup"] is None  # only token-routed models get a FLOP count
    assert len(timing["load_average"]) == 2 and timing["contended"] in (True, False) and timing["threads"] >= 1


def test_paired_timing_needs_recorded_batches(tiny_llama_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--variant", "dense", "--task", "arc_easy",
            "--data-dir", str(data_dir), "--out", str(out), "--limit", "2",
            "--reference-model", str(tiny_llama_dir), "--timing-batches", "0"]  # fmt: skip
    assert radial_main(argv) != 0
    assert "--timing-batches 0: 0 is less than the minimum of 1" in capsys.readouterr().err
    assert not out.exists()


def test_any_lm_eval_task_from_an_include_path(tiny_llama_dir, tmp_path):
    """The user's own task YAMLs (none of radial's five), through --include-path as lm_eval takes them:
    the headline metric is the first of each task's metric_list, and the paired timing works for
    multiple-choice and generation alike."""
    from conftest import write_user_tasks

    folder = write_user_tasks(tmp_path / "my-tasks")
    out = tmp_path / "eval" / "{task}.json"
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--variant", "dense", "--task", "toy_parity", "toy_echo",
            "--include-path", str(folder), "--out", str(out), "--limit", "4", "--batch-size", "2",
            "--reference-model", str(tiny_llama_dir), "--timing-repeats", "1", "--timing-decode-steps", "3"]  # fmt: skip
    assert radial_main(argv) == 0  # no --data-dir: none of radial's own tasks
    parity = json.loads((tmp_path / "eval" / "toy_parity.json").read_text())
    echo = json.loads((tmp_path / "eval" / "toy_echo.json").read_text())
    assert parity["metric"] == "acc_norm" and parity["n_examples"] == 4
    assert parity["accuracy"] == parity["lm_eval"]["results"]["toy_parity"]["acc_norm,none"]
    assert echo["metric"] == "exact_match" and echo["accuracy"] == echo["lm_eval"]["results"]["toy_echo"]["exact_match,none"]
    assert parity["timing"]["decode_steps"] == 0 and echo["timing"]["decode_steps"] == 3
    assert parity["timing"]["speedup"] > 0 and echo["timing"]["speedup"] > 0


@pytest.mark.slow  # indexes lm-eval's thousands of task files, twice (~20 s each)
def test_an_unknown_task_names_itself_and_where_it_was_looked_for(tiny_llama_dir, tmp_path, capsys):
    from conftest import write_user_tasks

    folder = write_user_tasks(tmp_path / "my-tasks")
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--variant", "dense", "--task", "toy_parityy",
            "--include-path", str(folder), "--out", str(out)]  # fmt: skip
    assert radial_main(argv) != 0
    err = capsys.readouterr().err
    assert "--task: unknown task 'toy_parityy'" in err and f"task registry and {folder}" in err
    assert "close: toy_parity" in err and "Traceback" not in err
    assert not out.exists()
    argv[argv.index("toy_parityy")] = "ai2_arc"  # a tag: a list of tasks, no score of its own
    assert radial_main(argv) != 0
    assert "'ai2_arc' is an lm-eval tag" in capsys.readouterr().err


def test_evaluate_group_accuracy_is_weighted_by_size(tiny_llama_dir, data_dir, tmp_path):
    result = _evaluate(tiny_llama_dir, data_dir, "mmlu", tmp_path / "eval.json")
    sizes = MMLU_TEST_ROWS
    assert {s: result["lm_eval"]["n-samples"][f"radial_mmlu_{s}"]["effective"] for s in sizes} == sizes
    weighted = sum(result["subtasks"][s] * n for s, n in sizes.items()) / sum(sizes.values())
    assert result["accuracy"] == pytest.approx(weighted)  # as lm-eval's mmlu: every question counts once
    assert result["n_examples"] == sum(sizes.values())
    assert set(result["lm_eval"]["groups"]) == {"radial_mmlu", "radial_mmlu_stem", "radial_mmlu_humanities"}


def test_evaluate_missing_model_folder_is_a_clear_error(data_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", str(tmp_path / "no-model"), "--variant", "dense", "--task", "arc_easy",
            "--data-dir", str(data_dir), "--out", str(tmp_path / "eval.json")]  # fmt: skip
    assert radial_main(argv) == 2
    assert f"model folder {tmp_path / 'no-model'} not found" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


def test_generation_longer_than_the_context_is_a_clear_error(tiny_llama_dir, data_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--variant", "dense", "--task", "gsm8k",
            "--data-dir", str(data_dir), "--out", str(tmp_path / "eval.json")]  # fmt: skip
    assert radial_main(argv) == 2  # lm-eval's default 256 new tokens do not fit the tiny model's 256 positions
    assert "pass --max-gen-toks below 256" in capsys.readouterr().err


def test_batching_and_a_tokenizer_without_pad_token_do_not_change_results(
    tiny_llama_dir, tiny_tokenizer, data_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    no_pad_dir = tmp_path / "no-pad"  # the same model; lm-eval must pick a pad token to batch
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(no_pad_dir)
    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    backend.no_padding()  # a padded call elsewhere on the shared fixture leaves padding (and its pad token) set
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(no_pad_dir)
    assert AutoTokenizer.from_pretrained(no_pad_dir).pad_token is None

    common = ("--limit", "3", "--max-gen-toks", "8", "--log-samples")
    one = _evaluate(tiny_llama_dir, data_dir, "synthetic", tmp_path / "b1.json", *common)
    four = _evaluate(no_pad_dir, data_dir, "synthetic", tmp_path / "b4.json", *common, "--batch-size", "4")
    assert one["samples"] == four["samples"]


# ---------------------------------------------------------------- layer counting


def test_layer_counter_counts_every_layer_of_a_dense_model(tiny_tokenizer):
    import torch

    from conftest import make_tiny_model
    from radial.stages.evaluate import LayerCounter, average_executed_layers

    model = make_tiny_model("qwen2", num_layers=3)
    inputs = tiny_tokenizer(["3+5-2=", "7+4="], return_tensors="pt", padding=True)
    batch, length = inputs["input_ids"].shape
    started = time.perf_counter()
    with LayerCounter(model) as counter, torch.no_grad():
        model(**inputs)
        time.sleep(0.3)  # work outside the model's forwards is not on the forward clock
        model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    elapsed = time.perf_counter() - started
    assert counter.forward_calls == 1 + 4
    assert counter.layer_calls == 3 * 5
    assert average_executed_layers(model, counter) == 3.0
    # the plain forward and generate's prefill see the whole prompt; its 3 decoding steps one token per row
    assert counter.forward_tokens == 2 * batch * length + 3 * batch
    assert 0 < counter.forward_seconds <= elapsed - 0.3
    model(**inputs)  # hooks are gone after the block
    assert counter.forward_calls == 5


def test_layer_counter_prefers_the_models_own_count():
    from conftest import make_tiny_model
    from radial.stages.evaluate import LayerCounter, average_executed_layers

    model = make_tiny_model("llama", num_layers=4)
    model.radial_executed_layers = lambda: 2.5
    with LayerCounter(model) as counter:
        pass
    assert average_executed_layers(model, counter) == 2.5


# ---------------------------------------------------------------- the key test: same numbers as lm_eval


@pytest.mark.slow
def test_python_path_matches_the_lm_eval_command_line(tiny_llama_dir, data_dir, tmp_path):
    """Dense numbers from `radial evaluate` equal `lm_eval --model hf` on the same folder and tasks."""
    from lm_eval.utils import sanitize_list

    tasks_dir = eval_tasks.materialize(data_dir, tmp_path / "tasks", eval_tasks.TASKS)
    limit, batch_size, max_gen_toks, seed = "6", "2", "24", "3"
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_llama_dir},dtype=float32",
        "--include_path", str(tasks_dir), "--tasks", ",".join(eval_tasks.lm_eval_name(t) for t in eval_tasks.TASKS),
        "--limit", limit, "--device", "cpu", "--batch_size", batch_size, "--seed", seed,
        "--gen_kwargs", f"max_gen_toks={max_gen_toks}", "--log_samples", "--output_path", str(tmp_path / "cli"),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    (results_file,) = (tmp_path / "cli").glob("**/results_*.json")
    cli = json.loads(results_file.read_text())

    for task in eval_tasks.TASKS:
        # lm_eval takes each task's own shots; radial's defaults are the workflow's (evaluate.num_fewshot).
        name = eval_tasks.lm_eval_name(task)
        shots = next(n for leaf, n in cli["n-shot"].items() if leaf == name or leaf.startswith(name + "_"))
        ours = _evaluate(tiny_llama_dir, data_dir, task, tmp_path / f"{task}.json", "--limit", limit,
                         "--batch-size", batch_size, "--max-gen-toks", max_gen_toks, "--seed", seed,
                         "--num-fewshot", str(shots), "--log-samples")  # fmt: skip
        for name, metrics in ours["lm_eval"]["results"].items():
            for key, value in metrics.items():
                if "," in key and "stderr" not in key:
                    assert value == cli["results"][name][key], (name, key)
        assert ours["lm_eval"]["n-samples"] == {name: cli["n-samples"][name] for name in ours["lm_eval"]["n-samples"]}

        # Per example: the same prompt, the same raw responses (log-likelihoods or generated text).
        for name, samples in ours["samples"].items():
            (samples_file,) = (tmp_path / "cli").glob(f"**/samples_{name}_*.jsonl")
            theirs = {(s["doc_id"], s["filter"]): s for s in read_jsonl(samples_file)}
            assert len(theirs) == len(samples)
            for sample in samples:
                other = theirs[(sample["doc_id"], sample["filter"])]
                assert sample["prompt_hash"] == other["prompt_hash"]
                # lm_eval writes responses with every leaf as str (its sanitize_list)
                assert sanitize_list(sample["resps"]) == other["resps"]
                assert sanitize_list(sample["filtered_resps"]) == other["filtered_resps"]

    arc = json.loads((tmp_path / "arc_easy.json").read_text())
    assert arc["accuracy"] == cli["results"]["radial_arc_easy"]["acc,none"]
    gsm8k = json.loads((tmp_path / "gsm8k.json").read_text())
    assert gsm8k["accuracy"] == cli["results"]["radial_gsm8k"]["exact_match,flexible-extract"]


def test_routed_model_folder_evaluates_with_its_executed_layers(tiny_llama_dir, tiny_tokenizer, data_dir, tmp_path):
    """A saved routed model (static path skipping layer 2 of 4) runs through the stock harness at batch > 1."""
    from radial.routing import RoutedForCausalLM

    routed_dir = tmp_path / "routed"
    RoutedForCausalLM.from_base(str(tiny_llama_dir), paths=[0, 1, 3]).save_pretrained(routed_dir)
    tiny_tokenizer.save_pretrained(routed_dir)
    dense = _evaluate(tiny_llama_dir, data_dir, "arc_easy", tmp_path / "dense.json", "--batch-size", "4")
    routed = _evaluate(routed_dir, data_dir, "arc_easy", tmp_path / "routed.json", "--batch-size", "4")
    assert dense["avg_executed_layers"] == 4
    assert routed["avg_executed_layers"] == 3
    assert routed["n_examples"] == dense["n_examples"]


def test_token_routed_model_runs_sparse_and_counts_real_tokens_at_any_batch_size(
    tiny_llama_dir, tiny_tokenizer, data_dir, tmp_path
):
    """Loglikelihood batches reach the model with their mask: padding is neither routed, run nor counted."""
    from radial.routing import RandomTokenRouter, RoutedForCausalLM

    routed_dir = tmp_path / "token-routed"
    RoutedForCausalLM.from_base(str(tiny_llama_dir), router=RandomTokenRouter(4, fraction=0.5, seed=3)).save_pretrained(
        routed_dir
    )
    tiny_tokenizer.save_pretrained(routed_dir)
    alone = _evaluate(routed_dir, data_dir, "arc_easy", tmp_path / "b1.json", "--batch-size", "1", "--limit", "6")
    batched = _evaluate(routed_dir, data_dir, "arc_easy", tmp_path / "b4.json", "--batch-size", "4", "--limit", "6",
                        "--reference-model", str(tiny_llama_dir), "--timing-repeats", "1")  # fmt: skip
    assert batched["token_execution"] == "sparse (skip: layer)"
    assert 1.2 < batched["timing"]["ideal_speedup"] < 3.0  # about half of the layers' work left
    assert 0 < batched["timing"]["padding_share"] < 0.5  # ARC's choices differ in length: a batch of 4 is padded
    assert batched["unmasked_loglikelihood_rows"] == 0
    assert batched["avg_executed_layers"] == pytest.approx(alone["avg_executed_layers"], abs=1e-6)
    assert 1.0 < batched["avg_executed_layers"] < 3.0
    assert batched["accuracy"] == alone["accuracy"]


@pytest.mark.parametrize("task", ["arc_easy", "synthetic"])
def test_routed_examples_get_the_same_path_at_any_batch_size(task, tiny_llama_dir, tiny_tokenizer, data_dir, tmp_path):
    """Dr.LLM routers and the confidence exit decide from the question only: batch 1 and 16 agree."""
    import torch

    from radial.routing import ConfidenceExitRouter, DrLLMRouter, RoutedForCausalLM

    torch.manual_seed(0)
    drllm = DrLLMRouter(4, 32, bottleneck=8)
    for linear in (m for layer in drllm.layers for m in layer if isinstance(m, torch.nn.Linear)):
        torch.nn.init.normal_(linear.weight, std=3.0)  # decisive actions that vary with the input
    for name, router in {"drllm": drllm, "exit": ConfidenceExitRouter(4, exits=[1, 2, 3], threshold=0.02)}.items():
        folder = tmp_path / name
        RoutedForCausalLM.from_base(str(tiny_llama_dir), router=router).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        runs = [
            _evaluate(folder, data_dir, task, tmp_path / f"{name}-{size}.json", "--batch-size", size, "--limit", "4",
                      "--max-gen-toks", "8")  # fmt: skip
            for size in ("1", "16")
        ]
        assert runs[0]["accuracy"] == runs[1]["accuracy"]
        assert runs[0]["avg_executed_layers"] == pytest.approx(runs[1]["avg_executed_layers"], abs=1e-9), name
        assert runs[1]["unmasked_loglikelihood_rows"] == 0
        assert 0 < runs[1]["avg_executed_layers"], name


def test_several_tasks_in_one_process_equal_each_task_alone(tiny_llama_dir, tiny_tokenizer, data_dir, tmp_path, capsys):
    """One process, one model load, one JSON per task: the same records as separate runs; a skip bias moves the knob."""
    from radial.routing import RandomTokenRouter, RoutedForCausalLM

    folder = tmp_path / "token-routed"
    RoutedForCausalLM.from_base(str(tiny_llama_dir), router=RandomTokenRouter(4, fraction=0.5, seed=3)).save_pretrained(
        folder
    )
    tiny_tokenizer.save_pretrained(folder)
    common = ["--limit", "6", "--max-gen-toks", "8", "--batch-size", "4"]
    alone = {
        "arc_easy": _evaluate(folder, data_dir, "arc_easy", tmp_path / "alone-arc.json", *common),
        "synthetic": _evaluate(folder, data_dir, "synthetic", tmp_path / "alone-syn.json", *common, "--limit", "2"),
    }
    argv = ["evaluate", "--model", str(folder), "--variant", "radial", "--task", "arc_easy", "synthetic",
            "--data-dir", str(data_dir), "--out", str(tmp_path / "together" / "{task}.json"), *common,
            "--limit-per-task", "synthetic=2", "--num-fewshot", "arc_easy=0", "synthetic=0"]  # fmt: skip
    assert radial_main(argv) == 0
    for task, record in alone.items():
        together = json.loads((tmp_path / "together" / f"{task}.json").read_text())
        assert together["task"] == task and together["limit"] == record["limit"]
        for key in ("accuracy", "avg_executed_layers", "n_examples", "num_fewshot", "subtasks"):
            assert together[key] == record[key], (task, key)

    fewer = _evaluate(folder, data_dir, "arc_easy", tmp_path / "biased.json", *common, "--skip-bias", "0.3")
    assert fewer["avg_executed_layers"] < alone["arc_easy"]["avg_executed_layers"] - 0.5  # 0.5 -> 0.2 of 4 layers

    capsys.readouterr()
    argv[argv.index("--out") + 1] = str(tmp_path / "one.json")
    assert radial_main(argv) == 2
    assert "with several tasks, --out must hold {task}" in capsys.readouterr().err
    assert radial_main(["evaluate", "--model", str(tiny_llama_dir), "--variant", "dense", "--task", "arc_easy",
                        "--data-dir", str(data_dir), "--out", str(tmp_path / "x.json"), "--skip-bias", "1"]) == 2  # fmt: skip
    assert "--skip-bias: the model is not routed" in capsys.readouterr().err


def test_a_broken_data_line_or_weights_file_is_one_line_naming_it(tiny_llama_dir, data_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(data_dir / "arc_easy", broken / "arc_easy")
    path = broken / "arc_easy" / "test.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # line 3 cut in half
    path.write_text("".join(lines))
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--variant", "dense", "--task", "arc_easy",
            "--data-dir", str(broken), "--out", str(tmp_path / "eval.json"), "--limit", "2"]  # fmt: skip
    assert radial_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"radial evaluate: error: {path}:3: not valid JSON") and "Traceback" not in err

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a copy cut short
    argv[argv.index("--model") + 1], argv[argv.index("--data-dir") + 1] = str(model), str(data_dir)
    assert radial_main(argv) == 2
    assert capsys.readouterr().err.startswith(f"radial evaluate: error: {weights}: truncated (")
    assert not (tmp_path / "eval.json").exists()


def test_timed_evaluations_take_turns_across_processes(tmp_path, monkeypatch, capsys):
    """Two snakemake processes (or a leftover job and a new one) never time side by side: the second waits."""
    from radial.stages.evaluate import exclusive_timing

    lock = tmp_path / "timing.lock"
    monkeypatch.setenv("RADIAL_TIMING_LOCK", str(lock))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, sys\nfrom radial.stages.evaluate import exclusive_timing\n"
        "with exclusive_timing(True):\n    print('held', flush=True)\n    time.sleep(3)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RADIAL_TIMING_LOCK": str(lock)})  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with exclusive_timing(True):
        waited = time.perf_counter() - start
    holder.wait(timeout=30)
    assert waited > 1.5, waited
    assert f"waiting for the evaluation holding {lock} (pid {holder.pid}) to finish" in capsys.readouterr().out
    start = time.perf_counter()
    with exclusive_timing(False), exclusive_timing(True):  # shared timing takes no lock; a free lock: no wait
        assert time.perf_counter() - start < 1


def test_timing_adds_rounds_until_the_variant_was_timed_for_timing_seconds(tiny_llama_dir, monkeypatch):
    """--timing-seconds adds rounds to a short batch (up to 5x --timing-repeats); 0 keeps exactly the repeats."""
    import argparse

    import torch

    from radial.stages import evaluate

    model, tokenizer = evaluate.load_model(tiny_llama_dir)
    batches = [{"input_ids": torch.randint(3, 200, (2, 12))}]
    clock = iter(range(10_000))  # each replay of either model takes 0.5 s of this clock
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(clock) * 0.5)

    def rounds(repeats: int, seconds: float) -> int:
        args = argparse.Namespace(
            model=tiny_llama_dir, reference_model=tiny_llama_dir, skip_bias=None, device="cpu",
            timing_repeats=repeats, timing_seconds=seconds, timing_decode_steps=2,
        )  # fmt: skip
        timing = evaluate.paired_timing(model, args, False, batches, tokenizer)
        assert len(timing["round_ratios"]) == timing["repeats"] and len(timing["model_s"]) == 2 * timing["repeats"]
        return timing["repeats"]

    assert rounds(3, 0) == 3
    assert rounds(2, 3.0) == 3  # 2 rounds time the model for 4 x 0.5 s = 2 s < 3 s: one more
    assert rounds(2, 1000.0) == 10  # at most 5x the repeats
