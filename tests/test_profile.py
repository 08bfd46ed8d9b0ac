"""Residual profiling: every metric against a hand computation, the CLI end to end, determinism."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from radial.stages import profile
from radial.__main__ import main as radial_main
from radial.stages.profile import METRICS, calibration_text, collect_statistics, summarize

PAD_ID = 2


def hand_statistics(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run one unpadded row [1, T] layer by layer through the layers' own submodules.

    Returns per metric a [num_layers, T] tensor, plus the hand-made block outputs [L, T, d].
    """
    x = model.model.embed_tokens(input_ids)
    position_embeddings = model.model.rotary_emb(x, torch.arange(input_ids.shape[1])[None])
    rows = {name: [] for name in METRICS}
    outputs = []
    for layer in model.model.layers:
        a, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(x), position_embeddings=position_embeddings, attention_mask=None
        )
        h = x + a
        m = layer.mlp(layer.post_attention_layernorm(h))
        y = h + m
        cosine = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        rows["residual_ratio"].append((y - x).norm(dim=-1) / y.norm(dim=-1))
        rows["attn_ratio"].append(a.norm(dim=-1) / (x + a).norm(dim=-1))
        rows["mlp_ratio"].append(m.norm(dim=-1) / (h + m).norm(dim=-1))
        rows["cosine"].append(cosine)
        rows["block_influence"].append(1 - cosine)
        outputs.append(y[0])
        x = y
    stats = {name: torch.cat(values) for name, values in rows.items()}  # [L, T]
    stats["outputs"] = torch.stack(outputs)
    return stats


def right_padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), PAD_ID)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def test_every_metric_matches_hand_computation_and_padding_is_excluded():
    model = make_tiny_model("llama", num_layers=3)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 320, (n,), generator=generator) for n in (6, 11, 3)]

    hand = [hand_statistics(model, s[None]) for s in sequences]
    # The hand chain is the model itself: its block outputs are the model's hidden states.
    hidden_states = model(sequences[1][None], output_hidden_states=True).hidden_states
    for layer in range(2):
        torch.testing.assert_close(hand[1]["outputs"][layer], hidden_states[layer + 1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.norm(hand[1]["outputs"][-1]), hidden_states[-1][0], atol=1e-5, rtol=1e-5)

    input_ids, attention_mask = right_padded(sequences)
    stats = collect_statistics(model, input_ids, attention_mask)

    lengths = [len(s) for s in sequences]
    assert stats["position"].tolist() == [p for n in lengths for p in range(n)]
    assert stats["example"].tolist() == [row for row, n in enumerate(lengths) for _ in range(n)]
    for name in METRICS:
        assert stats[name].shape == (3, sum(lengths))
        expected = torch.cat([h[name] for h in hand], dim=1)
        torch.testing.assert_close(stats[name], expected, atol=1e-5, rtol=1e-5, msg=name)

    # A single unpadded row gives the same numbers as its slice of the padded batch.
    alone = collect_statistics(model, sequences[2][None], torch.ones(1, lengths[2], dtype=torch.long))
    start = lengths[0] + lengths[1]
    for name in METRICS:
        torch.testing.assert_close(alone[name], stats[name][:, start:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layers_without_findable_sub_blocks_keep_block_statistics(monkeypatch):
    model = make_tiny_model("llama", num_layers=2)
    input_ids = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(2))
    hand = hand_statistics(model, input_ids)
    monkeypatch.setattr(profile, "layer_parts", lambda layer: (None, None))

    stats = collect_statistics(model, input_ids, torch.ones_like(input_ids))

    assert torch.isnan(stats["attn_ratio"]).all() and torch.isnan(stats["mlp_ratio"]).all()
    for name in ("residual_ratio", "block_influence", "cosine"):
        torch.testing.assert_close(stats[name], hand[name], atol=1e-5, rtol=1e-5)
    summary = summarize(stats)
    assert summary["attn_ratio"]["median"] == [None, None]
    assert all(value is not None for value in summary["cosine"]["median"])


def test_summarize_gives_quartiles_and_mean_per_layer():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 10.0]])
    summary = summarize({name: values for name in METRICS})
    assert summary["cosine"] == {"median": [3.0, 0.0], "q1": [2.0, 0.0], "q3": [4.0, 0.0], "mean": [3.0, 2.0]}


CALIBRATION_ROWS = [
    {"id": "a/0", "task": "arc_easy", "split": "test", "question": "Which gas do plants take in?",
     "choices": ["oxygen", "carbon dioxide", "sand"], "labels": ["A", "B", "C"], "answer": 1},
    {"id": "g/0", "task": "gsm8k", "split": "test", "question": "What is 40 + 2?", "choices": [], "labels": [],
     "answer": "42", "solution": "40 + 2 = 42\n#### 42"},
    {"id": "s/0", "task": "synthetic", "split": "test", "question": "7+4-9+2=", "choices": [], "labels": [],
     "answer": "4", "level": 3},
]


def test_calibration_text_covers_question_choices_and_answer():
    mc, gsm8k, synthetic = (calibration_text(row) for row in CALIBRATION_ROWS)
    assert mc == "Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. sand\nAnswer: B. carbon dioxide"
    assert gsm8k == "What is 40 + 2?\n40 + 2 = 42\n#### 42"
    assert synthetic == "7+4-9+2=4"


def write_calibration_file(path: Path, copies: int = 4) -> Path:
    rows = []
    for copy in range(copies):
        for row in CALIBRATION_ROWS:
            rows.append(row | {"id": f"{row['id']}-{copy}", "question": row["question"] + " " * copy + str(copy)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_writes_every_output(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    data = write_calibration_file(tmp_path / "calibration.jsonl")
    out = tmp_path / "profile"
    result = subprocess.run(
        [sys.executable, "-m", "radial", "profile", "--model", str(tiny_model_dir), "--data", str(data),
         "--out", str(out), "--max-examples", "12", "--max-length", "16", "--batch-size", "5"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap.png", "layers.png", "per_layer.csv", "per_token.npz", "summary.json"
    ]

    summary = json.loads((out / "summary.json").read_text())
    num_layers = summary["num_layers"]
    assert num_layers == 4 and summary["n_examples"] == 12
    from transformers import AutoModelForCausalLM

    assert summary["num_parameters"] == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [calibration_text(row) for row in map(json.loads, data.read_text().splitlines())]
    expected_tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=16)["input_ids"])
    assert summary["n_tokens"] == expected_tokens  # every real token counted, no padding

    metrics = summary["metrics"]
    for name in METRICS:
        for stat in ("median", "q1", "q3", "mean"):
            values = np.array(metrics[name][stat])
            assert values.shape == (num_layers,)
            low, high = (-1.0, 1.0) if name == "cosine" else (0.0, np.inf)
            assert ((values >= low - 1e-6) & (values <= high + 1e-6)).all(), (name, stat, values)
        assert (np.array(metrics[name]["q1"]) <= np.array(metrics[name]["q3"])).all()
    np.testing.assert_allclose(metrics["block_influence"]["median"], 1 - np.array(metrics["cosine"]["median"]), atol=1e-6)
    np.testing.assert_allclose(metrics["block_influence"]["q1"], 1 - np.array(metrics["cosine"]["q3"]), atol=1e-6)

    per_token = np.load(out / "per_token.npz")
    for name in METRICS:
        assert per_token[name].shape == (num_layers, expected_tokens)
    np.testing.assert_allclose(per_token["block_influence"], 1 - per_token["cosine"], atol=1e-6)
    assert per_token["position"].max() < 16 and sorted(set(per_token["example"])) == list(range(12))

    with open(out / "per_layer.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == list(range(num_layers))
    assert float(rows[0]["residual_ratio_median"]) == pytest.approx(metrics["residual_ratio"]["median"][0], rel=1e-5)

    import matplotlib.image

    for image in ("heatmap.png", "layers.png"):
        pixels = matplotlib.image.imread(out / image)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0


def run_in_process(model_dir: Path, data: Path, out: Path, seed: int) -> int:
    return radial_main(
        ["profile", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-examples", "5",
         "--max-length", "12", "--batch-size", "2", "--seed", str(seed), "--wandb-mode", "disabled"]
    )


def test_same_seed_gives_identical_summary(tiny_llama_dir, tmp_path):
    data = write_calibration_file(tmp_path / "calibration.jsonl")
    assert run_in_process(tiny_llama_dir, data, tmp_path / "a", seed=3) == 0
    assert run_in_process(tiny_llama_dir, data, tmp_path / "b", seed=3) == 0
    assert run_in_process(tiny_llama_dir, data, tmp_path / "c", seed=4) == 0
    summary_a = (tmp_path / "a" / "summary.json").read_bytes()
    assert summary_a == (tmp_path / "b" / "summary.json").read_bytes()
    assert summary_a != (tmp_path / "c" / "summary.json").read_bytes()  # another seed samples other rows


def test_missing_model_folder_fails_cleanly(tmp_path, capsys):
    data = write_calibration_file(tmp_path / "calibration.jsonl")
    missing = tmp_path / "no-such-model"
    out = tmp_path / "profile"

    assert run_in_process(missing, data, out, seed=0) != 0

    assert str(missing) in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.jsonl"]  # no temporary left behind either
