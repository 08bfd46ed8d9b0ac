"""The base model stage: the embedded tiny Llama end to end, determinism, copying a local model, errors."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from radial.__main__ import main as radial_main
from radial.corpus import pack_examples, pretraining_batches, prompt_target_examples, text_examples
from radial.stages.base_model import greedy_answers

# Small enough to train in a few seconds; the stage's own defaults take minutes.
QUICK_FLAGS = [
    "--layers", "4", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "300",
    "--seq-len", "64", "--synthetic-batch-size", "16", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5",
    "--eval-examples-per-level", "20",
]  # fmt: skip


def synthetic_row(rng: random.Random, level: int, split: str, index: int) -> dict:
    """One row of the synthetic task in the shared schema: 2k+1 digits joined by +, answer their sum."""
    digits = [rng.randrange(10) for _ in range(2 * level + 1)]
    question, total = "+".join(map(str, digits)), sum(digits)
    return {
        "id": f"synthetic/{split}/{index}",
        "task": "synthetic",
        "split": split,
        "question": question + "=",
        "choices": [],
        "labels": [],
        "answer": f"{total:02d}",
        "level": level,
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Synthetic train/test (levels 1-5) plus a few ARC-style train rows to mix in."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for split, per_level in (("train", 300), ("test", 20)):
        rows = [synthetic_row(rng, level, split, i) for level in range(1, 6) for i in range(per_level)]
        write_rows(root / "synthetic" / f"{split}.jsonl", rows)
    arc = [
        {"id": f"arc/{i}", "task": "arc_easy", "split": "train", "question": f"Which gas do plants take in, {i}?",
         "choices": ["oxygen", "carbon dioxide", "sand", "iron"], "labels": ["A", "B", "C", "D"], "answer": 1}
        for i in range(20)
    ]  # fmt: skip
    write_rows(root / "arc_easy" / "train.jsonl", arc)
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "radial", "base-model", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "base"
    result = run_cli("--out", str(out), "--data-dir", str(data_dir), "--steps", "40", *QUICK_FLAGS)
    assert result.returncode == 0, result.stderr
    return out


def test_embedded_model_reloads_as_requested_llama(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    assert (embedded_dir / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tokenizer)
    # Digits are single tokens and the prompt carries no BOS, as lm-eval will feed it.
    assert tokenizer.convert_ids_to_tokens(tokenizer("7+4+9=")["input_ids"]) == ["7", "+", "4", "+", "9", "="]


def test_embedded_summary_and_loss_curve(embedded_dir, data_dir):
    summary = json.loads((embedded_dir / "radial_base.json").read_text())
    assert summary["source"] == "embedded"
    assert summary["num_layers"] == 4
    assert summary["num_parameters"] > 0
    # Chance per level = share of the most common answer among the evaluated test questions.
    test_rows = [json.loads(line) for line in (data_dir / "synthetic" / "test.jsonl").open()]
    level_1_answers = collections.Counter(row["answer"] for row in test_rows if row["level"] == 1)
    assert set(summary["chance"]) == {"1", "2", "3", "4", "5"}
    assert summary["chance"]["1"] == max(level_1_answers.values()) / sum(level_1_answers.values())
    train = summary["train"]
    assert train["steps"] == 40 and train["tokens_seen"] > 0 and train["wall_time_s"] > 0
    assert train["final_loss"] < train["initial_loss"]
    assert set(summary["synthetic_accuracy"]) == {"1", "2", "3", "4", "5"}
    assert all(0.0 <= value <= 1.0 for value in summary["synthetic_accuracy"].values())
    assert summary["config"]["layers"] == 4 and summary["config"]["steps"] == 40
    assert (embedded_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not list(embedded_dir.parent.glob(".base.*")), "temporary folder left behind"


def test_left_padded_batches_answer_like_single_prompts(embedded_dir, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    prompts = ["3+5=", "7+4-9+2=", "1-8+0-2+6-4=", "9=", "2+2-2="]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=3, batch_size=len(prompts))
    one_by_one = [greedy_answers(model, tokenizer, [prompt], max_new_tokens=3)[0] for prompt in prompts]
    assert batched == one_by_one


def test_training_is_deterministic_for_a_seed(tmp_path, data_dir):
    def weights(out: Path, seed: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        flags = ["--data-dir", str(data_dir), "--steps", "3", "--eval-examples-per-level", "1", "--seed", str(seed)]
        assert radial_main(["base-model", "--out", str(out), *QUICK_FLAGS, *flags]) == 0
        return load_file(out / "model.safetensors")

    first, second, other_seed = weights(tmp_path / "a", 1), weights(tmp_path / "b", 1), weights(tmp_path / "c", 2)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other_seed[name]) for name in first)


def test_layer_drop_leaves_out_deeper_layers_more_often_and_is_seeded(tmp_path, data_dir):
    from radial.stages.base_model import layer_drop_rates

    assert layer_drop_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert layer_drop_rates(1, 0.5) == [0.0]

    def pretrain(out: Path, layer_drop: str) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        flags = ["--data-dir", str(data_dir), "--steps", "30", "--eval-examples-per-level", "1", "--layer-drop", layer_drop]
        assert radial_main(["base-model", "--out", str(out), *QUICK_FLAGS, *flags]) == 0
        return json.loads((out / "radial_base.json").read_text())["train"], load_file(out / "model.safetensors")

    (full, _), (dropped, weights), (again, same_weights) = (
        pretrain(tmp_path / "full", "0"), pretrain(tmp_path / "drop", "0.9"), pretrain(tmp_path / "again", "0.9")
    )
    assert full["mean_layers_per_step"] == 4 and full["layer_drop"] == 0
    # Expected layers per step with rates 0, 0.3, 0.6, 0.9: 4 - 1.8 = 2.2 (30 steps: well below 4).
    assert 1.5 < dropped["mean_layers_per_step"] < 3.2
    assert again == dropped | {"wall_time_s": again["wall_time_s"]}
    assert all(torch.equal(weights[name], same_weights[name]) for name in weights)


def test_local_model_is_copied_exactly(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    assert radial_main(["base-model", "--out", str(out), "--name-or-path", str(tiny_llama_dir)]) == 0
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    copy = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    input_ids = tokenizer("Question: Which gas do plants take in?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(input_ids).logits, copy(input_ids).logits)
    summary = json.loads((out / "radial_base.json").read_text())
    assert summary["source"] == str(tiny_llama_dir)
    assert summary["num_layers"] == 4 and summary["train"] is None and summary["synthetic_accuracy"] == {}


def test_missing_local_model_names_the_config_key(tmp_path, capsys):
    out = tmp_path / "base"
    missing = tmp_path / "no-such-model"
    assert radial_main(["base-model", "--out", str(out), "--name-or-path", str(missing)]) == 2
    error = capsys.readouterr().err
    assert "model.name_or_path" in error and str(missing) in error
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_hub_id_offline_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "base"
    start = time.perf_counter()
    assert radial_main(["base-model", "--out", str(out), "--name-or-path", "radial-test/no-such-model"]) == 2
    assert time.perf_counter() - start < 10
    error = capsys.readouterr().err
    assert "model.name_or_path" in error and "radial-test/no-such-model" in error and "HF_HUB_OFFLINE" in error
    assert not out.exists()


def test_hub_id_behind_an_endpoint_that_is_not_the_hub_fails_fast(tmp_path, capsys, monkeypatch):
    """A server that accepts connections but answers 503 (an overloaded proxy, a wrong HF_ENDPOINT):
    transformers alone retries for about 45 s and then blames the internet connection."""
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    out = tmp_path / "base"
    try:
        start = time.perf_counter()
        assert radial_main(["base-model", "--out", str(out), "--name-or-path", "radial-test/no-such-model"]) == 2
        assert time.perf_counter() - start < 15
    finally:
        server.shutdown()
    error = capsys.readouterr().err
    assert "model.name_or_path" in error and "did not serve radial-test/no-such-model" in error
    assert f"127.0.0.1:{server.server_port}" in error and not out.exists()


def test_embedded_model_needs_the_synthetic_train_split(tmp_path, capsys):
    assert radial_main(["base-model", "--out", str(tmp_path / "base"), "--data-dir", str(tmp_path)]) == 2
    assert str(tmp_path / "synthetic" / "train.jsonl") in capsys.readouterr().err


def test_packed_sequences_start_at_example_boundaries():
    examples = [([i] * length, [-i] * length) for i, length in enumerate([3, 5, 2, 7, 4, 6, 1, 12])]
    stream = pack_examples(examples, seq_len=10, rng=random.Random(0))
    sequences = [next(stream) for _ in range(20)]
    for ids, labels in sequences:
        assert 0 < len(ids) <= 10 and len(labels) == len(ids)
        position = 0
        while position < len(ids):  # walk whole examples; the 12-long one is cut to 10
            example_ids, example_labels = (part[:10] for part in examples[ids[position]])
            assert ids[position : position + len(example_ids)] == example_ids
            assert labels[position : position + len(example_ids)] == example_labels
            position += len(example_ids)


def test_synthetic_loss_is_on_the_answer_only(embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    [(ids, labels)] = prompt_target_examples(tokenizer, [("7+4+9=", "20\n")])
    assert tokenizer.decode(ids) == "7+4+9=20\n"
    learned = [label for label in labels if label != -100]
    assert tokenizer.decode(learned) == "20\n" and labels[: len(ids) - len(learned)] == [-100] * (len(ids) - len(learned))
    [(text_ids, text_labels)] = text_examples(tokenizer, ["Question: why?"])
    assert text_labels == text_ids


def test_pretraining_puts_one_question_per_row_and_mixes_benchmark_steps():
    questions = [([10 + i, 20 + i, 30 + i][: 2 + i % 2], [-100, 20 + i, 30 + i][: 2 + i % 2]) for i in range(40)]
    benchmark = [([7] * 9, [7] * 9)] * 50
    batches = pretraining_batches(
        questions, benchmark, 0.25, synthetic_batch_size=20, batch_size=4, seq_len=8, pad_id=0, rng=random.Random(0)
    )
    seen, benchmark_steps = [], 0
    for _ in range(200):
        input_ids, labels = next(batches)
        if input_ids[0, 0] == 7:
            benchmark_steps += 1
            assert input_ids.shape == (4, 8) and (input_ids == 7).all()  # packed and cut to seq_len
            continue
        assert input_ids.shape[0] == 20
        for ids, row_labels in zip(input_ids.tolist(), labels.tolist()):
            i = ids[0] - 10
            length = len(questions[i][0])
            assert ids[:length] == questions[i][0] and row_labels[:length] == questions[i][1]  # from position 0
            assert ids[length:] == [0] * (len(ids) - length) and row_labels[length:] == [-100] * (len(ids) - length)
            seen.append(i)
    assert 0.15 < benchmark_steps / 200 < 0.35
    first_epoch = seen[:40]
    assert sorted(first_epoch) == list(range(40)) and first_epoch != list(range(40))  # each once, shuffled
    def first_batches(seed):
        stream = pretraining_batches(questions, benchmark, 0.25, 20, 4, 8, 0, random.Random(seed))
        return [next(stream)[0] for _ in range(10)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(0)))  # seeded
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(1)))

@pytest.mark.slow
def test_tiny_setting_of_the_end_to_end_config_learns(tmp_path, data_dir):
    result = run_cli(
        "--out", str(tmp_path / "base"), "--data-dir", str(data_dir), "--layers", "4", "--hidden-size", "64",
        "--steps", "150",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "base" / "radial_base.json").read_text())["train"]
    assert train["final_loss"] < train["initial_loss"] - 2
