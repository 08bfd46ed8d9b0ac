"""Radial distillation: the KL loss, straight-through token gates, cache consistency, the stage."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from radial.stages import distill
from radial.routing import GateTokenRouter, RoutedForCausalLM
from radial.utils import RadialError

NUM_LAYERS = 4
PAD = 2


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skipping_student(seed: int = 0) -> RoutedForCausalLM:
    """A tiny token-routed model whose gates send some tokens past some layers."""
    base = make_tiny_model("llama", num_layers=NUM_LAYERS, seed=seed)
    router = GateTokenRouter(NUM_LAYERS, base.config.hidden_size, init_bias=0.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in router.gates:
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator))
    return RoutedForCausalLM.from_base(base, router=router).eval()


def test_kl_is_zero_for_identical_logits_and_matches_torch():
    student = torch.randn(2, 5, 11)
    teacher = torch.randn(2, 5, 11)
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, 3:] = False
    assert distill.distillation_kl(teacher, teacher, real, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 2.0
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(student[real] / T, -1), torch.log_softmax(teacher[real] / T, -1), log_target=True,
        reduction="batchmean",
    ) * T**2
    assert distill.distillation_kl(student, teacher, real, T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_straight_through_gates_route_hard_and_reach_the_router():
    student = skipping_student()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        hard = student(ids, attention_mask=mask, use_cache=False).logits
    student.reset_layer_counter()
    student.train()
    with student.straight_through_token_gates() as gates:
        soft = student(ids, attention_mask=mask, use_cache=False).logits
    # The trainable forward (reference execution) routes exactly as inference (sparse execution):
    # equal up to float summation order at the real positions (padding is never run sparsely).
    assert student.token_execution == "sparse"
    torch.testing.assert_close(soft[mask.bool()], hard[mask.bool()], atol=1e-5, rtol=1e-5)
    assert len(gates) == NUM_LAYERS
    stacked = torch.stack(gates)
    assert set(stacked.unique().tolist()) == {0.0, 1.0}  # values are the hard decisions
    real = mask.bool()
    fraction = distill.executed_fraction(gates, real)
    assert 0 < fraction.item() < 1
    (soft[real].logsumexp(-1).mean() + fraction).backward()
    for gate in student.router.gates:
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert student.token_gates is None  # collection stops outside the context


def test_student_generation_with_cache_equals_without(tiny_tokenizer):
    student = skipping_student(seed=3)
    prompts = ["3+5-2=", "7+4-9+2=", "Question: Which gas"]
    tiny_tokenizer.padding_side = "left"
    encoded = tiny_tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        cached = student.generate(**encoded, use_cache=True, **kwargs)
        uncached = student.generate(**encoded, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # Some tokens really skip layers, so the check is not the dense model's.
    student.reset_layer_counter()
    with torch.no_grad():
        student(**encoded, use_cache=False)
    assert student.radial_executed_layers() < NUM_LAYERS - 0.2
    assert distill.cache_consistency(student, tiny_tokenizer, prompts) is True


def write_data(folder: Path, count: int = 200) -> None:
    synthetic = folder / "synthetic"
    synthetic.mkdir(parents=True)
    rows = []
    for i in range(count):
        a, b, c = i % 10, (i * 7) % 10, (i * 3) % 10
        rows.append({"id": f"synthetic/train/{i}", "task": "synthetic", "question": f"{a}+{b}+{c}=", "answer": str(a + b + c), "level": 1})
    (synthetic / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (synthetic / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))


def run_stage(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    return distill.main(parser.parse_args(argv))


def test_distill_stage_steers_depth_and_reloads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    write_data(tmp_path / "data")
    out = tmp_path / "radial"
    argv = [
        "--model", tiny_llama_dir, "--data-dir", tmp_path / "data", "--out", out, "--steps", 30,
        "--batch-size", 8, "--seq-len", 32, "--target-fraction", 0.5, "--compute-weight", 20,
        "--router-lr", 0.05, "--lr", 1e-3, "--warmup-steps", 2, "--eval-every", 10, "--checkpoint-every", 10,
        "--zero-stage", 3, "--wandb-mode", "disabled", "--hidden-weight", 0.1,
    ]
    assert run_stage([str(a) for a in argv]) == 0

    info = json.loads((out / "training.json").read_text())
    history = info["history"]
    assert len(history) == 30
    assert history[0]["executed_fraction"] == 1.0  # the gates start open: the student is the teacher
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0.3 < info["held_out"]["executed_fraction"] < 0.8  # steered from 1.0 towards the target 0.5
    assert info["held_out"]["executed_layers"] == pytest.approx(info["held_out"]["executed_fraction"] * NUM_LAYERS)
    assert len(info["held_out"]["layer_share"]) == NUM_LAYERS
    assert info["cache_equals_no_cache"] is True
    assert "val_kl" in history[9] and "hidden_mse" in history[0]
    for name in ("curves.png", "layers.png", "router.safetensors", "base/model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name

    import radial.routing  # noqa: F401

    student = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(student, RoutedForCausalLM) and student.config.routing_mode == "token"
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    changed = [
        name for name, p in student.model.named_parameters() if not torch.equal(p, teacher.model.get_parameter(name))
    ]
    assert changed  # the layers were fine-tuned and the fine-tuned copy is what loads
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    student.reset_layer_counter()
    with torch.no_grad():
        student(ids, use_cache=False)
    assert student.radial_executed_layers() < NUM_LAYERS
    assert math.isfinite(info["held_out"]["kl"])


def test_training_batches_attend_to_prompts_and_mask_only_padding():
    class Batches:
        pad_id = PAD

        def __call__(self, micro_step):
            ids = torch.tensor([[5, 6, 7, 8], [5, 6, PAD, PAD]])
            labels = torch.tensor([[-100, -100, 7, 8], [-100, 6, -100, -100]])  # prompts carry no loss
            return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

    batch = distill.with_padding_mask(Batches())(0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_reuse_student_starts_as_the_teacher_and_reloads_with_its_slots(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import radial.routing  # noqa: F401

    write_data(tmp_path / "data")
    out = tmp_path / "radial-reuse"
    argv = [
        "--model", tiny_llama_dir, "--data-dir", tmp_path / "data", "--out", out, "--steps", 12, "--reuse",
        "--reuse-layers", 1, 2, "--max-depth", 5, "--batch-size", 8, "--seq-len", 32, "--target-fraction", 1.0,
        "--compute-weight", 0, "--router-lr", 0.05, "--eval-every", 6, "--checkpoint-every", 6,
        "--zero-stage", 1, "--wandb-mode", "disabled",
    ]  # fmt: skip
    assert run_stage([str(a) for a in argv]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["history"][0]["executed_fraction"] == 1.0  # first visits open, reuse slots closed: the teacher
    assert info["history"][0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert len(info["held_out"]["layer_share"]) == NUM_LAYERS + 2 and info["cache_equals_no_cache"] is True
    assert json.loads((out / "radial_variant.json").read_text())["method"] == "radial-reuse"
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.token_slots == (0, 1, 1, 2, 2, 3) and student.budget.max_layers == 5
    assert student.router.num_layers == NUM_LAYERS + 2


def test_reuse_layers_outside_the_model_are_named(tiny_llama_dir, tmp_path):
    write_data(tmp_path / "data")
    argv = ["--model", tiny_llama_dir, "--data-dir", tmp_path / "data", "--out", tmp_path / "x", "--reuse",
            "--reuse-layers", 9, "--wandb-mode", "disabled"]  # fmt: skip
    with pytest.raises(RadialError, match=r"--reuse-layers: layer 9 is not one of the model's 4 layers \(0-3\)"):
        run_stage([str(a) for a in argv])
    assert not (tmp_path / "x").exists()
