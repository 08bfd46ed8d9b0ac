"""MCTS layer-path labels: prefix-shared evaluation equals the routed model, the search, the stage.

Fast tests use tiny random models; the slow ones kill a shard with SIGKILL and resume it, and
compare MCTS with a brute force over every path of a small trained model.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from radial import synthetic
from radial.__main__ import main as radial_main
from radial.stages.mcts import gather_labels, improved, select_examples, shard_examples
from radial.path_eval import (
    PathEvaluator,
    build_scorer,
    gsm8k_verdict,
    render_prompt,
    synthetic_verdict,
)
from radial.path_search import PathSearch, SearchSettings, all_paths, brute_force, path_key, search
from radial.routing import RoutedForCausalLM, counts_to_path
from radial.utils import read_jsonl, write_jsonl

CONTRACT_FIELDS = ("id", "task", "path", "layer_labels", "reward", "default_correct", "simulations", "layers_saved")


def random_paths(num_layers: int, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    paths = [(), tuple(range(num_layers))]
    while len(paths) < count:
        paths.append(counts_to_path([rng.choice([0, 1, 1, 2]) for _ in range(num_layers)]))
    return paths


@pytest.fixture(scope="module")
def routed_llama():
    return RoutedForCausalLM.from_base(make_tiny_model("llama", num_layers=4)).eval()


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    write_jsonl(data_dir / "synthetic" / "train.jsonl", synthetic.generate(60, 3, 0, "train", test_rows=10))
    return data_dir


# ---------------------------------------------------------------------------------------------
# Prefix-shared evaluation


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_evaluator_logits_equal_the_routed_model_for_every_path(arch):
    routed = RoutedForCausalLM.from_base(make_tiny_model(arch, num_layers=4)).eval()
    prompt = [5, 9, 33, 7, 41, 12]
    continuation = (17, 4, 90)
    shared = PathEvaluator(routed, prompt)
    naive = PathEvaluator(routed, prompt, share_prefixes=False)
    for path in random_paths(4, 7):
        with torch.no_grad():
            expected = routed(torch.tensor([prompt + list(continuation)]), paths=list(path), use_cache=False).logits[0]
        for evaluator in (shared, naive):
            evaluator.start_path()
            torch.testing.assert_close(evaluator.logits(path), expected[: len(prompt)], atol=1e-5, rtol=0)
            # a continuation block attends to the prompt's keys/values of the same (layer, occurrence)
            got = evaluator.logits(path, (continuation,))
            torch.testing.assert_close(got, expected[len(prompt) :], atol=1e-5, rtol=0)
            # and one token at a time (decoding) gives the same as the whole block
            blocks = ()
            for token in continuation:
                blocks = blocks + ((token,),)
                got = evaluator.logits(path, blocks)[-1]
                torch.testing.assert_close(got, expected[len(prompt) + len(blocks) - 1], atol=1e-5, rtol=0)
    assert shared.block_evaluations < naive.block_evaluations


def test_a_path_only_computes_what_follows_its_first_change(routed_llama):
    evaluator = PathEvaluator(routed_llama, [3, 4, 5, 6])
    evaluator.logits((0, 1, 2, 3))
    assert evaluator.block_evaluations == 4
    evaluator.logits((0, 1, 3))  # shares (0, 1): runs only layer 3
    assert evaluator.block_evaluations == 5
    evaluator.logits((0, 1, 2, 2, 3))  # shares (0, 1, 2): runs 2 (second time) and 3
    assert evaluator.block_evaluations == 7
    evaluator.logits((0, 1, 3))  # already evaluated: free
    assert evaluator.block_evaluations == 7
    assert evaluator.layer_tokens == 7 * 4
    assert evaluator.naive_block_evaluations == 4 + 3 + 5 + 3  # from scratch, every request runs its whole path


@pytest.mark.parametrize("task", ["synthetic", "arc_easy"])
def test_prefix_shared_search_gives_the_naive_labels_and_counts_the_naive_cost(tiny_llama_dir, task):
    from transformers import AutoTokenizer

    from radial.stages.mcts import label_example

    routed = RoutedForCausalLM.from_base(str(tiny_llama_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = [{"id": f"{task}/{i}", "task": task, "question": f"{i}+{i + 1}=", "answer": str(2 * i + 1)}
            for i in range(3)]
    if task == "arc_easy":
        rows = [row | {"choices": ["red", "green", "blue sky"], "answer": i % 3} for i, row in enumerate(rows)]
    settings = SearchSettings(simulations=40)
    costs = ("block_evaluations", "naive_block_evaluations", "layer_tokens", "search_seconds")
    for row in rows:
        label = {
            mode: label_example(
                routed, tokenizer, row, settings, seed=0, max_new_tokens=4, share_prefixes=mode == "cached"
            )
            for mode in ("naive", "cached")
        }
        assert {k: v for k, v in label["cached"].items() if k not in costs} == {
            k: v for k, v in label["naive"].items() if k not in costs
        }
        assert label["cached"]["naive_block_evaluations"] == label["naive"]["block_evaluations"]
        assert label["naive"]["naive_block_evaluations"] == label["naive"]["block_evaluations"]
        assert label["cached"]["block_evaluations"] < label["naive"]["block_evaluations"]


def test_greedy_answers_equal_routed_generate(tiny_llama_dir):
    routed = RoutedForCausalLM.from_base(str(tiny_llama_dir)).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"id": "synthetic/train/0", "question": "3+5+2=", "answer": "10", "level": 1}
    _, scorer = build_scorer(routed, tokenizer, "synthetic", row, max_new_tokens=5)
    scorer.verdict = lambda text: None  # decode the whole budget, to compare every token
    prompt_ids = torch.tensor([tokenizer("3+5+2=")["input_ids"]])
    for path in random_paths(4, 8, seed=1):
        generated = routed.generate(prompt_ids, paths=list(path), max_new_tokens=5, do_sample=False, pad_token_id=2)
        tokens = [t for t in generated[0, prompt_ids.shape[1] :].tolist()]
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert scorer(path).answer == tokenizer.decode(tokens, skip_special_tokens=True)


def test_choice_reward_is_lm_eval_loglikelihood_argmax(routed_llama, tiny_tokenizer):
    row = {"id": "arc_easy/train/x", "question": "Which gas do plants take in?",
           "choices": ["water", "carbon dioxide", "sand"], "labels": ["A", "B", "C"], "answer": 1}  # fmt: skip
    prompt, scorer = build_scorer(routed_llama, tiny_tokenizer, "arc_easy", row, max_new_tokens=4)
    assert prompt == "Question: Which gas do plants take in?\nAnswer:"
    path = (0, 2, 2, 3)
    context = tiny_tokenizer(prompt)["input_ids"]
    scores = []
    for choice in row["choices"]:
        whole = tiny_tokenizer(prompt + " " + choice)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(routed_llama(torch.tensor([whole]), paths=list(path)).logits[0], -1)
        scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    best = max(range(3), key=scores.__getitem__)
    outcome = scorer(path)
    assert outcome.answer == "ABC"[best]
    assert outcome.correct == (best == 1)


def test_answer_verdicts():
    verdict = synthetic_verdict("17")
    assert verdict("1") is None and verdict("17") is None
    assert verdict("17\n") is True and verdict("2") is False and verdict("171") is False and verdict(" 17\n") is False
    gsm_verdict, final = gsm8k_verdict("1,250")
    assert gsm_verdict("so 3 + 4 = 7") is None
    assert gsm_verdict("She pays $1,250.\n\nQuestion: next") is True
    assert final("it is 12 then 1250") and not final("it is 1250 then 12")
    assert render_prompt("gsm8k", {"question": "Why?"}) == "Question: Why?\nAnswer:"
    assert render_prompt("synthetic", {"question": "3+4="}) == "3+4="


# ---------------------------------------------------------------------------------------------
# The search


def explore_whole_tree(num_layers: int, settings: SearchSettings) -> list[tuple[int, ...]]:
    tree = PathSearch(num_layers, settings, lambda path: False, random.Random(0))
    found, stack = [], [tree._new_node((1,) * num_layers, 0, False, None)]
    while stack:
        node = stack.pop()
        found.append(node.counts)
        stack.extend(tree._child(node, edit) for edit in node.edits)
    return found


@pytest.mark.parametrize("settings", [SearchSettings(), SearchSettings(max_skip=3), SearchSettings(repeat=False)])
def test_edit_tree_holds_every_path_exactly_once(settings):
    found = explore_whole_tree(5, settings)
    values = (0, 1, 2) if settings.repeat else (0, 1)
    assert sorted(found) == sorted(itertools.product(values, repeat=5))  # all of them, no duplicates


def test_path_length_limit_is_respected():
    settings = SearchSettings(max_length_factor=1.25)
    found = explore_whole_tree(4, settings)
    assert max(sum(counts) for counts in found) == 5
    assert sorted(counts_to_path(c) for c in found) == sorted(all_paths(4, settings))


def test_search_stops_early_and_labels_the_shortest_correct_path():
    # correct iff layer 2 is skipped: the default is wrong, so the first correct path ends the search
    def evaluate(path):
        return 2 not in path

    result = search(6, SearchSettings(), evaluate, random.Random(1))
    assert not result.default_correct and result.correct and 2 not in result.path
    assert result.simulations < 200
    assert result.layer_labels == [result.path.count(i) for i in range(6)]
    # without early stopping, 200 simulations find the globally shortest such path (the empty one)
    full = search(6, SearchSettings(early_stop=False), evaluate, random.Random(1))
    assert full.simulations == 200 and full.path == ()


def test_search_keeps_the_default_when_nothing_is_correct_and_is_deterministic():
    results = [search(5, SearchSettings(simulations=60), lambda p: False, random.Random("x")) for _ in range(2)]
    assert results[0].path == tuple(range(5)) and not results[0].correct and results[0].simulations == 60
    paths = [search(6, SearchSettings(), lambda p: len(set(p)) == 4, random.Random(s)) for s in ("a", "a", "b")]
    assert paths[0] == paths[1]


def test_preference_among_correct_paths():
    assert min([(0, 1, 2), (0, 0, 1), (1, 2)], key=path_key) == (1, 2)
    assert min([(0, 1, 2), (0, 0, 1)], key=path_key) == (0, 0, 1)  # same length: fewer distinct layers


# ---------------------------------------------------------------------------------------------
# The stage


def search_args(model_dir, data_dir, out: Path, *, shard=0, shards=1, examples=6, simulations=20,
                checkpoint_every=2, progress: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    args = [
        "mcts", "search", "--model", str(model_dir), "--data-dir", str(data_dir), "--examples", str(examples),
        "--shard", str(shard), "--shards", str(shards), "--out", str(out), "--simulations", str(simulations),
        "--checkpoint-every", str(checkpoint_every), "--max-new-tokens", "4", "--wandb-mode", "disabled", *extra,
    ]  # fmt: skip
    return args + (["--progress", str(progress)] if progress else [])


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "search_seconds"} for row in rows]


def test_shards_hold_every_searched_example_and_a_gather_without_correct_paths_fails(
    tiny_llama_dir, synthetic_data, tmp_path, capsys
):
    shard_files = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(shard_files):
        assert radial_main(search_args(tiny_llama_dir, synthetic_data, out, shard=i, shards=2)) == 0
    searched = gather_labels(shard_files)
    selected = select_examples(synthetic_data, ["synthetic"], 6, seed=0)
    assert [x["id"] for x in searched] == [row["id"] for row in selected]  # all, once, in order
    for label, row in zip(searched, selected):
        assert all(field in label for field in CONTRACT_FIELDS)
        assert label["level"] == row["level"] and label["prompt"] == row["question"]
        assert len(label["layer_labels"]) == 4 and set(label["layer_labels"]) <= {0, 1, 2}
        assert counts_to_path(label["layer_labels"]) == tuple(label["path"])
        assert label["layers_saved"] == 4 - len(label["path"])
        assert 1 <= label["simulations"] <= 20
    # The random tiny model answers nothing: no label set, and nothing written as if it were one.
    assert not any(x["reward"] for x in searched)
    capsys.readouterr()
    assert radial_main(["mcts", "gather", *map(str, shard_files), "--out-dir", str(tmp_path / "mcts"),
                        "--wandb-mode", "disabled"]) == 2  # fmt: skip
    assert "no example of 6 searched has a correct path" in capsys.readouterr().err
    assert not (tmp_path / "mcts" / "labels.jsonl").exists()


def label_row(index: int, *, correct: bool, default_correct: bool, path: tuple[int, ...], num_layers: int = 4) -> dict:
    """A search result row as `mcts search` writes it."""
    counts = [path.count(layer) for layer in range(num_layers)]
    return {
        "id": f"synthetic-{index}", "task": "synthetic", "level": 1 + index % 5, "question": f"q{index}",
        "prompt": f"q{index}", "answer": "1", "path": list(path), "layer_labels": counts,
        "reward": float(correct), "default_correct": default_correct, "simulations": 10,
        "layers_saved": num_layers - len(path), "num_layers": num_layers, "prediction": "1",
        "paths_evaluated": 10, "block_evaluations": 20, "naive_block_evaluations": 40, "layer_tokens": 100,
        "search_seconds": 0.1,
    }  # fmt: skip


def test_label_set_drops_unsolved_examples_and_enriches_the_improved_share(tmp_path, capsys):
    """Dr.LLM's label set: no example without a correct path; at least `improved_share` improved on the default."""
    dense = (0, 1, 2, 3)
    rows = (
        [label_row(i, correct=False, default_correct=False, path=dense) for i in range(0, 10)]  # unsolved
        + [label_row(i, correct=True, default_correct=True, path=(0, 2)) for i in range(10, 30)]  # shorter
        + [label_row(i, correct=True, default_correct=False, path=(0, 1, 1, 2, 3)) for i in range(30, 40)]  # fixed
        + [label_row(i, correct=True, default_correct=True, path=dense) for i in range(40, 100)]  # unimproved
    )
    random.Random(0).shuffle(rows)
    write_jsonl(tmp_path / "shard.jsonl", rows)
    gather = ["mcts", "gather", str(tmp_path / "shard.jsonl"), "--wandb-mode", "disabled"]
    assert radial_main([*gather, "--out-dir", str(tmp_path / "half"), "--improved-share", "0.5"]) == 0
    assert "10 without a correct path and 30 for enrichment dropped" in capsys.readouterr().out
    kept = read_jsonl(tmp_path / "half" / "labels.jsonl")
    assert all(x["reward"] == 1.0 for x in kept)
    assert len(kept) == 60 and sum(map(improved, kept)) == 30  # every improved example, half of the set
    assert [x["id"] for x in kept] == [x["id"] for x in rows if x in kept]  # search order
    stats = json.loads((tmp_path / "half" / "stats.json").read_text())
    assert stats["examples"] == 100 and stats["label_accuracy"] == 0.9  # figures of everything searched
    assert stats["label_set"] | {"class_counts_kept": None} == {
        "searched": 100, "kept": 60, "dropped_no_correct_path": 10, "dropped_for_enrichment": 30,
        "improved_share_target": 0.5, "improved_share_searched": 0.3, "improved_share_kept": 0.5,
        "mean_layers_saved_kept": (20 * 2 - 10) / 60, "class_counts_kept": None,
    }  # fmt: skip
    assert sum(stats["label_set"]["class_counts_kept"].values()) == 60 * 4

    assert radial_main([*gather, "--out-dir", str(tmp_path / "again"), "--improved-share", "0.5"]) == 0
    assert read_jsonl(tmp_path / "again" / "labels.jsonl") == kept  # seeded
    assert radial_main([*gather, "--out-dir", str(tmp_path / "all"), "--improved-share", "0"]) == 0
    assert len(read_jsonl(tmp_path / "all" / "labels.jsonl")) == 90
    assert radial_main([*gather, "--out-dir", str(tmp_path / "only"), "--improved-share", "1"]) == 0
    assert all(map(improved, read_jsonl(tmp_path / "only" / "labels.jsonl")))


def test_resume_after_a_torn_checkpoint_gives_the_same_labels(tiny_llama_dir, synthetic_data, tmp_path, capsys):
    reference = tmp_path / "reference.jsonl"
    assert radial_main(search_args(tiny_llama_dir, synthetic_data, reference)) == 0
    out, progress = tmp_path / "resumed.jsonl", tmp_path / "progress.jsonl"
    assert radial_main(search_args(tiny_llama_dir, synthetic_data, out, progress=progress)) == 0
    lines = progress.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 6  # fingerprint, then one line per example
    progress.write_text("".join(lines[:4]) + lines[4][:20])  # as if killed while writing example 4
    out.unlink()
    capsys.readouterr()
    assert radial_main(search_args(tiny_llama_dir, synthetic_data, out, progress=progress)) == 0
    assert "resuming shard 1/1 after 3 of 6 examples" in capsys.readouterr().out
    assert without_timing(read_jsonl(out)) == without_timing(read_jsonl(reference))
    assert len(progress.read_text().splitlines()) == 1 + 6


def test_progress_of_another_configuration_is_not_resumed(tiny_llama_dir, synthetic_data, tmp_path, capsys):
    out, progress = tmp_path / "labels.jsonl", tmp_path / "progress.jsonl"
    assert radial_main(search_args(tiny_llama_dir, synthetic_data, out, progress=progress)) == 0
    capsys.readouterr()
    changed = search_args(tiny_llama_dir, synthetic_data, out, progress=progress, extra=("--length-penalty", "1"))
    assert radial_main(changed) == 0
    assert "progress of another configuration" in capsys.readouterr().out
    assert len(read_jsonl(out)) == 6


def test_bad_input_names_the_problem(tiny_llama_dir, tmp_path, capsys):
    assert radial_main(search_args(tiny_llama_dir, tmp_path, tmp_path / "x.jsonl")) == 2
    assert "synthetic/train.jsonl" in capsys.readouterr().err
    assert radial_main(search_args(tiny_llama_dir, tmp_path, tmp_path / "x.jsonl", shard=2, shards=2)) == 2
    assert "--shard must be in 0..1" in capsys.readouterr().err
    duplicate = tmp_path / "dup.jsonl"
    write_jsonl(duplicate, [{"id": "a"}])
    with pytest.raises(Exception, match="example a is in both"):
        gather_labels([duplicate, duplicate])


def test_shards_split_the_examples_round_robin():
    rows = [{"id": str(i)} for i in range(7)]
    shards = [shard_examples(rows, i, 3) for i in range(3)]
    assert sorted(r["id"] for s in shards for r in s) == [str(i) for i in range(7)]
    assert [r["id"] for r in shards[1]] == ["1", "4"]


# ---------------------------------------------------------------------------------------------
# Slow: SIGKILL and resume; MCTS against a brute force over every path


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_without_losing_or_duplicating_labels(tiny_llama_dir, synthetic_data, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")

    def command(name: str) -> list[str]:
        args = search_args(tiny_llama_dir, synthetic_data, tmp_path / f"{name}.jsonl", examples=24, simulations=200,
                           checkpoint_every=1, progress=tmp_path / f"{name}.progress.jsonl")  # fmt: skip
        return [sys.executable, "-m", "radial", *args]

    subprocess.run(command("reference"), check=True, env=env, capture_output=True)
    process = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed.progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 1 + 3:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(progress.read_text().splitlines()) - 1
    assert 3 <= done_before < 24, "the shard must be killed part-way"
    assert not (tmp_path / "killed.jsonl").exists()  # no half-finished output

    rerun = subprocess.run(command("killed"), check=True, env=env, capture_output=True, text=True)
    assert f"resuming shard 1/1 after {done_before} of 24 examples" in rerun.stdout
    resumed, reference = read_jsonl(tmp_path / "killed.jsonl"), read_jsonl(tmp_path / "reference.jsonl")
    assert len({row["id"] for row in resumed}) == len(resumed) == 24
    assert without_timing(resumed) == without_timing(reference)


@pytest.fixture(scope="module")
def trained_five_layer_model(tmp_path_factory) -> Path:
    """A 5-layer model pre-trained on the synthetic task by the base-model stage (a minute or two on CPU)."""
    root = tmp_path_factory.mktemp("optimality")
    write_jsonl(root / "data" / "synthetic" / "train.jsonl", synthetic.generate(3000, 5, 0, "train", test_rows=50))
    write_jsonl(root / "data" / "synthetic" / "test.jsonl", synthetic.generate(50, 5, 0, "test", test_rows=50))
    args = ["base-model", "--out", str(root / "model"), "--data-dir", str(root / "data"), "--layers", "5",
            "--hidden-size", "64", "--heads", "4", "--kv-heads", "2", "--intermediate-size", "192",
            "--vocab-size", "512", "--seq-len", "64", "--steps", "400", "--warmup-steps", "20",
            "--eval-examples-per-level", "10", "--threads", "2", "--wandb-mode", "disabled"]  # fmt: skip
    assert radial_main(args) == 0
    return root / "model"


@pytest.mark.integration
def test_mcts_finds_the_brute_force_shortest_correct_path(trained_five_layer_model):
    """Every path of a 5-layer model (3^5 = 243) against 200 MCTS simulations, on the model's real answers.

    Early stopping is off: it ends a search once the default is beaten, on purpose before the optimum.
    MCTS must find a correct path as short as the shortest one; with the label's tie-break (fewest
    distinct layers) as well for most examples (which of several equally good paths is arbitrary).
    """
    from radial.stages.mcts import load_routed

    routed, tokenizer = load_routed(trained_five_layer_model, "cpu")
    rows = synthetic.generate(40, 5, 7, "train", test_rows=50)
    settings = SearchSettings(early_stop=False)
    shortest, preferred, solvable = 0, 0, 0
    for row in rows:
        _, scorer = build_scorer(routed, tokenizer, "synthetic", row, max_new_tokens=4)
        correct = lambda path: scorer(path).correct  # noqa: E731
        optimum = brute_force(routed.num_layers, settings, correct)
        result = search(routed.num_layers, settings, correct, random.Random(f"radial-mcts/0/{row['id']}"))
        if optimum is None:
            assert not result.correct
            continue
        solvable += 1
        shortest += result.correct and len(result.path) == len(optimum)
        preferred += result.correct and path_key(result.path)[:2] == path_key(optimum)[:2]
    assert solvable >= 20, "too few examples have any correct path to measure the search"
    assert shortest / solvable >= 0.95, f"MCTS found a shortest correct path for {shortest} of {solvable} examples"
    assert preferred / solvable >= 0.9, f"... and the preferred one for {preferred} of {solvable}"


def test_ctrl_c_in_a_search_is_one_line_and_the_search_resumes(tiny_llama_dir, synthetic_data, tmp_path):
    out, progress = tmp_path / "labels.jsonl", tmp_path / "progress.jsonl"
    # Every simulation run (no early stop): ~0.5 s an example, so the search is still running when interrupted.
    argv = [sys.executable, "-m", "radial"] + search_args(tiny_llama_dir, synthetic_data, out, examples=40,
                                                          simulations=200, checkpoint_every=1, progress=progress,
                                                          extra=("--no-early-stop",))  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # A shell's background job (how CI may start pytest) ignores SIGINT, and children inherit that: the search
    # gets the terminal's default back, as Ctrl-C in a terminal finds it.
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=restore_sigint)  # fmt: skip
    deadline = time.time() + 120
    while not progress.is_file() or len(progress.read_text().splitlines()) < 2:  # a checkpointed example
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    message = "radial mcts: interrupted; no output was completed (run it again to resume where it can)"
    assert message in stderr.replace("\r", "\n").splitlines(), stderr[-2000:]  # a line of its own, not after the bar
    assert not out.exists()
    done = len(progress.read_text().splitlines()) - 1
    resumed = subprocess.run(argv[:-2] + ["--progress", str(progress)], env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0 and f"after {done} of 40 examples" in resumed.stdout
    assert len(read_jsonl(out)) == 40
