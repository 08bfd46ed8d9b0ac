"""Dr.LLM router training: loss, class weights, pooling, teacher forcing, the stage, resume after SIGKILL."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from radial.stages import routers as routers_train
from radial.routing import DrLLMRouter, RoutedForCausalLM, counts_to_path, windowed_mean_pool
from radial.utils import RadialError

NUM_LAYERS = 4  # conftest's tiny models


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_class_weights_are_effective_numbers_of_this_runs_counts():
    beta = 0.999
    weights = routers_train.class_weights([10, 1000, 0], beta)
    raw = [(1 - beta) / (1 - beta**10), (1 - beta) / (1 - beta**1000)]
    expected = [2 * w / sum(raw) for w in raw] + [0.0]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert weights[0] > weights[1]  # the rare class weighs more
    balanced = routers_train.class_weights([50, 50, 50], beta)
    assert balanced.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_a_class_too_rare_to_learn_is_learned_as_execute():
    """53 repeats among 11,916 labels (the embedded default's MCTS) fall under 1 %: they become execute."""
    assert routers_train.rare_classes([1839, 10024, 53], 0.01) == [2]
    assert routers_train.rare_classes([1839, 10024, 53], 0.0) == []
    assert routers_train.rare_classes([50, 10000, 50], 0.01) == [0, 2]
    assert routers_train.rare_classes([0, 100, 0], 0.5) == []  # absent classes have weight 0 already
    example = routers_train.LabelledExample("x", "synthetic", "1+2=", [0, 1, 2, 2])
    (skips_kept,) = routers_train.relabel_as_execute([example], [2])
    assert skips_kept.labels == [0, 1, 1, 1] and example.labels == [0, 1, 2, 2]


def test_focal_loss_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([1, 2])
    weights = torch.tensor([0.5, 1.0, 2.0])
    expected = 0.0
    for row, target in zip(logits.tolist(), targets.tolist()):
        p = math.exp(row[target]) / sum(math.exp(v) for v in row)
        expected += -weights[target].item() * (1 - p) ** 2 * math.log(p)
    expected /= 2
    assert routers_train.focal_loss(logits, targets, weights, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    # gamma 0 and unit weights: plain cross-entropy.
    plain = routers_train.focal_loss(logits, targets, torch.ones(3), gamma=0.0)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)


def test_f1_scores_by_hand():
    target = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 1])
    scores = routers_train.f1_scores(predicted, target)
    assert scores["f1_skip"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert scores["f1_execute"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert scores["f1_repeat"] == 0.0
    assert scores["macro_f1"] == pytest.approx((0.5 + 4 / 7 + 0.0) / 3)
    only_two = routers_train.f1_scores(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert math.isnan(only_two["f1_repeat"]) and only_two["macro_f1"] == 1.0


def test_window_pooling_over_left_padded_prompts():
    hidden = torch.arange(2 * 10 * 1, dtype=torch.float32).reshape(2, 10, 1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :7] = 0  # the second prompt has 3 real tokens, left-padded
    pooled, nonempty = windowed_mean_pool(hidden, mask, num_windows=4)
    # 10 tokens in 4 windows: positions 0-2, 3-4, 5-7, 8-9 (window = floor(rank * 4 / 10)).
    assert pooled[0, :, 0].tolist() == pytest.approx([1.0, 3.5, 6.0, 8.5])
    # 3 tokens (values 17, 18, 19) in 4 windows: 0, 1, 2 (floor(rank * 4 / 3)); window 3 is empty.
    assert nonempty[1].tolist() == [True, True, True, False]
    assert pooled[1, :, 0].tolist() == pytest.approx([17.0, 18.0, 19.0, 0.0])

    router = DrLLMRouter(NUM_LAYERS, 1, bottleneck=8, num_windows=4)
    direct = router(2, hidden, mask)
    assert torch.allclose(router.pooled_logits(2, pooled, nonempty), direct)
    # Logits are the mean over the non-empty windows only.
    window_logits = router.layers[2](pooled[1, :3])
    assert torch.allclose(direct[1], window_logits.mean(0), atol=1e-6)


def test_teacher_forced_states_follow_the_labelled_path(tiny_llama_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    routed = RoutedForCausalLM.from_base(base)
    examples = [
        routers_train.LabelledExample("a", "synthetic", "3+5-2=", [1, 0, 2, 1]),
        routers_train.LabelledExample("b", "synthetic", "7+4-9+2=", [0, 1, 1, 0]),
    ]
    pooled, nonempty = routers_train.teacher_forced_features(routed, tiny_tokenizer, examples, 3, 8, 64)
    assert pooled.shape == (2, NUM_LAYERS, 3, base.config.hidden_size)
    for row, example in enumerate(examples):
        ids = tiny_tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        for layer in range(NUM_LAYERS):
            prefix = counts_to_path(example.labels[:layer])
            with torch.no_grad():
                hidden = base.model.embed_tokens(ids)
                for step in prefix:  # the plainest loop over stock layers
                    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
                    hidden = base.model.layers[step](
                        hidden,
                        attention_mask=None,
                        position_ids=position_ids,
                        position_embeddings=base.model.rotary_emb(hidden, position_ids=position_ids),
                    )
            expected, _ = windowed_mean_pool(hidden, None, 3)
            assert torch.allclose(pooled[row, layer], expected[0], atol=1e-5), (row, layer)


def write_labels(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def learnable_labels(count: int) -> list[dict]:
    """Prompts whose first operand decides the label: small -> skip layer 2, large -> repeat layer 1."""
    rows = []
    for i in range(count):
        first = i % 10
        labels = [1, 1, 0, 1] if first < 5 else [1, 2, 1, 1]
        prompt = f"{first}+{(i * 7) % 10}-{(i * 3) % 10}="
        rows.append({"id": f"synthetic/train/{i}", "task": "synthetic", "prompt": prompt,
                     "path": list(counts_to_path(labels)), "layer_labels": labels, "level": 1})
    return rows


def test_bad_label_rows_are_named(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = learnable_labels(3)
    rows[1]["layer_labels"] = [1, 1, 3, 1]
    write_labels(path, rows)
    with pytest.raises(RadialError, match=r"labels.jsonl:2: layer_labels must be 4 values"):
        routers_train.load_labels(path, NUM_LAYERS, None)
    rows = learnable_labels(2)
    del rows[0]["prompt"]
    write_labels(path, rows)
    with pytest.raises(RadialError, match=r"labels.jsonl:1: the row has no 'prompt'; pass --data-dir"):
        routers_train.load_labels(path, NUM_LAYERS, None)


def test_rows_without_a_correct_path_are_no_supervision(tmp_path):
    rows = learnable_labels(4)
    rows[1]["reward"], rows[2]["reward"] = 0.0, 1.0
    write_labels(tmp_path / "labels.jsonl", rows)
    examples = routers_train.load_labels(tmp_path / "labels.jsonl", NUM_LAYERS, None)
    assert [e.id for e in examples] == [rows[i]["id"] for i in (0, 2, 3)]
    for row in rows:
        row["reward"] = 0.0
    write_labels(tmp_path / "labels.jsonl", rows)
    with pytest.raises(RadialError, match="no label row has a correct path"):
        routers_train.load_labels(tmp_path / "labels.jsonl", NUM_LAYERS, None)


def test_prompts_are_looked_up_by_id_in_the_data(tmp_path):
    data = tmp_path / "data" / "synthetic"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text(
        json.dumps({"id": "synthetic/train/7", "task": "synthetic", "question": "1+2+3=", "answer": "6", "level": 1}) + "\n"
    )
    rows = [{"id": "synthetic/train/7", "task": "synthetic", "path": [0, 1, 2, 3], "layer_labels": [1, 1, 1, 1]}]
    write_labels(tmp_path / "labels.jsonl", rows)
    (example,) = routers_train.load_labels(tmp_path / "labels.jsonl", NUM_LAYERS, tmp_path / "data")
    assert example.prompt == "1+2+3="
    rows[0]["id"] = "synthetic/train/8"
    write_labels(tmp_path / "labels.jsonl", rows)
    with pytest.raises(RadialError, match="id 'synthetic/train/8' not found"):
        routers_train.load_labels(tmp_path / "labels.jsonl", NUM_LAYERS, tmp_path / "data")


def stage_args(model_dir: Path, labels: Path, out: Path, **overrides) -> list[str]:
    values = {
        "--model": model_dir, "--labels": labels, "--out": out, "--steps": 40, "--batch-size": 16,
        "--grad-accum": 2, "--lr": 3e-3, "--warmup-steps": 4, "--eval-every": 20, "--checkpoint-every": 10,
        "--zero-stage": 2, "--val-fraction": 0.25, "--bottleneck": 32, "--wandb-mode": "disabled",
    }
    values.update(overrides)
    return [str(item) for key, value in values.items() for item in (key, value)]


def run_stage(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    routers_train.add_arguments(parser)
    return routers_train.main(parser.parse_args(argv))


def test_routers_stage_learns_the_labels_and_reloads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import radial.routing  # noqa: F401  (registers the routed model with the Auto classes)

    labels = tmp_path / "labels.jsonl"
    write_labels(labels, learnable_labels(80))
    out = tmp_path / "routers"
    assert run_stage(stage_args(tiny_llama_dir, labels, out)) == 0

    info = json.loads((out / "training.json").read_text())
    train = info["examples"]["train"]
    assert train + info["examples"]["validation"] == 80 and info["examples"]["validation"] > 0
    counts = info["label_counts"]  # each example: one skip or one repeat, three executes
    assert counts["execute"] == 3 * train and counts["skip"] + counts["repeat"] == train
    expected_weights = routers_train.class_weights([counts[a] for a in routers_train.ACTIONS], 0.999).tolist()
    assert list(info["class_weights"].values()) == pytest.approx(expected_weights)
    history = info["history"]
    assert len(history) == 40 and history[-1]["loss"] < history[0]["loss"]
    assert "val_macro_f1" in history[19] and "val_f1_repeat" in history[-1]
    assert info["validation"]["macro_f1"] > 0.6
    assert set(info["free_running"]) == {"executed_layers", "path_match"}
    for name in ("curves.png", "confusion.png", "router.safetensors", "tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "routers.checkpoints").exists()  # checkpoints (beside the output) go once it is complete

    routed = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(routed, RoutedForCausalLM) and routed.config.routing_mode == "router"
    assert isinstance(routed.router, DrLLMRouter) and routed.router.bottleneck == 32
    # The routers decide paths on their own (free running) and the model stays a working LM.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out_routed = routed(ids, use_cache=True)
    assert torch.isfinite(out_routed.logits).all()
    assert len(out_routed.past_key_values.paths[0]) == pytest.approx(routed.radial_executed_layers())


@pytest.mark.slow
def test_routers_stage_killed_with_sigkill_resumes_from_its_last_checkpoint(tiny_llama_dir, tmp_path):
    labels = tmp_path / "labels.jsonl"
    write_labels(labels, learnable_labels(80))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "radial", "routers"]
    common = {"--steps": 300, "--checkpoint-every": 25, "--eval-every": 100, "--batch-size": 8}

    reference = tmp_path / "reference"
    subprocess.run(
        command + stage_args(tiny_llama_dir, labels, reference, **common), env=env, check=True, capture_output=True
    )

    out, checkpoints = tmp_path / "killed", tmp_path / "killed.checkpoints"
    argv = command + stage_args(tiny_llama_dir, labels, out, **common)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (checkpoints / "latest").is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # let it train on past the checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()  # nothing half-written looks complete
    killed_at = (checkpoints / "latest").read_text().strip()
    assert killed_at != "step300"

    restarted = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    assert "resumed from" in restarted.stdout + restarted.stderr
    info = json.loads((out / "training.json").read_text())
    expected = json.loads((reference / "training.json").read_text())
    assert info["resumed_from_step"] == int(killed_at.removeprefix("step"))
    assert [row["step"] for row in info["history"]] == list(range(1, 301))
    assert [row["loss"] for row in info["history"]] == pytest.approx(
        [row["loss"] for row in expected["history"]], rel=1e-4, abs=1e-6
    )
    assert info["validation"]["macro_f1"] == pytest.approx(expected["validation"]["macro_f1"], abs=1e-6)


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher_follow_the_single_process_run(tiny_llama_dir, tmp_path):
    """The rule's multi-GPU command line, here with two CPU processes: 2 ranks x 8 rows = 1 rank x 16 rows."""
    labels = tmp_path / "labels.jsonl"
    write_labels(labels, learnable_labels(80))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    common = {"--steps": 12, "--checkpoint-every": 6, "--eval-every": 6, "--zero-stage": 3}
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "radial", "routers"]
        + stage_args(tiny_llama_dir, labels, single, **common, **{"--batch-size": 16}),
        env=env, check=True, capture_output=True,
    )
    launched = tmp_path / "launched"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29517"]
    subprocess.run(
        launcher + ["--no_local_rank", "--module", "radial", "routers"]
        + stage_args(tiny_llama_dir, labels, launched, **common, **{"--batch-size": 8}),
        env=env, check=True, capture_output=True,
    )
    one = json.loads((single / "training.json").read_text())
    two = json.loads((launched / "training.json").read_text())
    assert [row["loss"] for row in two["history"]] == pytest.approx([row["loss"] for row in one["history"]], rel=1e-4)
    assert two["validation"]["macro_f1"] == pytest.approx(one["validation"]["macro_f1"], abs=1e-6)
    assert (launched / "router.safetensors").is_file()
