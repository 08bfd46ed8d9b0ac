"""Decoder families beyond the Llama layout route, and every stage runs on them.

OPT (learned positions over the attention mask; OPT-350m's layout with project_in/out and no final
norm), GPT-NeoX / Pythia (parallel residual, partial rotary, the cache passed as `layer_past`),
Gemma 3 (sliding and full layers with a rotary table each, logit soft-capping) and the MoE decoders
(Mixtral, Qwen2-MoE), each as a tiny random model.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, write_user_tasks

from radial import synthetic
from radial.__main__ import main as radial_main
from radial.routing import RandomTokenRouter, RoutedForCausalLM, SparseFallbackWarning, reference_forward
from radial.utils import RadialError, write_jsonl

FAMILIES = ["opt", "opt_projected", "gpt_neox", "gemma3"]
MOE = ["mixtral", "qwen2_moe"]
NUM_LAYERS = 4
PAD = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def left_padded(lengths=(9, 5, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, 300, (length,), generator=generator)
        mask[row, -length:] = 1
    return ids, mask


def greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_routes_like_its_own_forward(arch):
    base = make_tiny_model(arch, num_layers=NUM_LAYERS)
    ids, mask = left_padded()
    with torch.no_grad():
        dense = RoutedForCausalLM.from_base(base)  # checks dense routing against base(ids).logits
        own = base(ids, attention_mask=mask).logits
        routed = dense(ids, attention_mask=mask).logits
        assert (own - routed)[mask.bool()].abs().max().item() <= 1e-5  # padding, positions: as the family does

        path = [0, 2, 2, 3]  # skips layer 1, repeats layer 2
        static = RoutedForCausalLM.from_base(base, paths=path)
        torch.testing.assert_close(static(ids[:1]).logits, reference_forward(base, ids[:1], path), atol=1e-5, rtol=0)
        dense_logits = dense(ids[:1]).logits
        assert (static(ids[:1]).logits - dense_logits).abs().max() > 1e-2 * dense_logits.abs().max()  # the path matters
        assert torch.equal(greedy(static, ids, mask), greedy(static, ids, mask, use_cache=False))


@pytest.mark.parametrize("arch", FAMILIES)
def test_token_routing_on_a_family_the_sparse_driver_cannot_split_says_so(arch):
    """Token routing runs (cached = uncached) through the reference, and says why, never silently."""
    base = make_tiny_model(arch, num_layers=NUM_LAYERS)
    routed = RoutedForCausalLM.from_base(copy.deepcopy(base), router=RandomTokenRouter(NUM_LAYERS, fraction=0.5, seed=1))
    ids, mask = left_padded(seed=3)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        cached = greedy(routed, ids, mask)
        uncached = greedy(routed, ids, mask, use_cache=False)
    assert torch.equal(cached, uncached)
    assert routed.token_execution.startswith("reference (reason: layers 0, 1, 2, 3: ")
    assert any(issubclass(w.category, SparseFallbackWarning) for w in caught)
    assert 0 < routed.radial_executed_layers() < NUM_LAYERS
    with pytest.raises(RadialError, match="token_skip 'mlp' cannot split decoder layer 0"):
        RoutedForCausalLM.from_base(base, router=RandomTokenRouter(NUM_LAYERS, fraction=0.5), token_skip="mlp")


# ---------------------------------------------------------------------------------------------
# Every stage on every family


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "synthetic" / "train.jsonl", synthetic.generate(40, 2, 0, "train", test_rows=8))
    write_jsonl(root / "synthetic" / "test.jsonl", synthetic.generate(8, 2, 0, "test", test_rows=8))
    return root


def labels_for(count: int) -> list[dict]:
    """Router labels of the MCTS contract: small first operand skips layer 2, large repeats layer 1."""
    rows = []
    for i in range(count):
        labels = [1, 1, 0, 1] if i % 10 < 5 else [1, 2, 1, 1]
        path = [layer for layer, times in enumerate(labels) for _ in range(times)]
        rows.append({"id": f"synthetic/train/{i}", "task": "synthetic", "prompt": f"{i % 10}+{i % 7}=",
                     "path": path, "layer_labels": labels, "level": 1})  # fmt: skip
    return rows


def run(*argv) -> None:
    assert radial_main([str(a) for a in argv] + ["--wandb-mode", "disabled"]) == 0


@pytest.mark.parametrize("arch", FAMILIES + MOE)
def test_every_stage_runs_on_the_family(arch, tmp_path, tiny_tokenizer, stage_data):
    model = tmp_path / "model"
    make_tiny_model(arch, num_layers=NUM_LAYERS).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)

    calibration = tmp_path / "calibration.jsonl"
    write_jsonl(calibration, [{"id": f"c{i}", "question": f"What is {i} plus {i + 1}?"} for i in range(6)])
    run("profile", "--model", model, "--data", calibration, "--out", tmp_path / "profile", "--max-examples", 6,
        "--max-length", 12, "--batch-size", 3)  # fmt: skip
    profile = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert len(profile["metrics"]["residual_ratio"]["median"]) == NUM_LAYERS

    run("mcts", "search", "--model", model, "--data-dir", stage_data, "--examples", 2, "--shard", 0, "--shards", 1,
        "--out", tmp_path / "shard.jsonl", "--simulations", 6, "--checkpoint-every", 1, "--max-new-tokens", 3)  # fmt: skip
    searched = [json.loads(line) for line in (tmp_path / "shard.jsonl").read_text().splitlines()]
    assert len(searched) == 2 and all(row["simulations"] > 0 and row["path"] for row in searched)

    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, labels_for(24))
    run("routers", "--model", model, "--labels", labels, "--out", tmp_path / "routers", "--steps", 4,
        "--batch-size", 8, "--eval-every", 2, "--checkpoint-every", 2, "--zero-stage", 2, "--val-fraction", 0.25,
        "--bottleneck", 16)  # fmt: skip
    run("distill", "--model", model, "--data-dir", stage_data, "--out", tmp_path / "radial", "--steps", 4,
        "--batch-size", 4, "--seq-len", 24, "--eval-every", 2, "--checkpoint-every", 2, "--zero-stage", 3,
        "--hidden-weight", 0.1)  # fmt: skip
    distilled = json.loads((tmp_path / "radial" / "training.json").read_text())
    assert distilled["cache_equals_no_cache"] is True

    tasks = write_user_tasks(tmp_path / "tasks")
    for variant in ("routers", "radial"):
        out = tmp_path / f"{variant}-{{task}}.json"
        run("evaluate", "--model", tmp_path / variant, "--variant", variant, "--task", "toy_parity", "synthetic",
            "--data-dir", stage_data, "--include-path", tasks, "--out", out, "--limit", 3, "--batch-size", 2,
            "--max-gen-toks", 4, "--reference-model", model, "--timing-repeats", 1, "--timing-batches", 1,
            "--timing-decode-steps", 2)  # fmt: skip
        for task in ("toy_parity", "synthetic"):
            result = json.loads(Path(str(out).format(task=task)).read_text())
            assert 0 < result["avg_executed_layers"] <= 2 * NUM_LAYERS, (variant, task)
            assert result["timing"]["speedup"] > 0
