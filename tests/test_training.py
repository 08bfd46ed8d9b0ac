"""The DeepSpeed training harness: config filling, ZeRO 2/3, frozen parameters, gathering, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import make_tiny_model
from radial import training
from radial.utils import RadialError

DATA = torch.randint(3, 300, (32, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_batches(micro_step: int) -> dict:
    rows = training.rank_batch_indices(len(DATA), 4, micro_step, seed=0)
    return {"input_ids": DATA[rows]}


def lm_loss(engine, batch):
    out = engine(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {"tokens": float(batch["input_ids"].numel())}


def config(stage: int, **overrides) -> training.TrainConfig:
    values = dict(
        steps=6, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=1, weight_decay=0.01, zero_stage=stage,
        checkpoint_every=3, seed=0, deepspeed_config=training.zero_config_file(stage),
    )
    values.update(overrides)
    return training.TrainConfig(**values)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factor = training.cosine_with_warmup(warmup_steps=4, total_steps=20)
    warmup = [factor(s) for s in range(4)]
    assert warmup == sorted(warmup) and warmup[-1] < 1
    assert factor(4) == pytest.approx(1.0)
    assert factor(12) == pytest.approx(0.5)
    assert factor(20) == pytest.approx(0.0, abs=1e-12)


def test_deepspeed_json_auto_values_are_filled_from_the_train_config():
    filled = training.deepspeed_config(config(3, batch_size=5, grad_accum=3, grad_clip=0.5))
    assert filled["train_micro_batch_size_per_gpu"] == 5
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["train_batch_size"] == 15
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert filled["zero_optimization"]["stage"] == 3
    assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert filled["zero_allow_untested_optimizer"] is True
    # The stage from the config wins over the file's.
    assert training.deepspeed_config(config(2, deepspeed_config=training.zero_config_file(3)))[
        "zero_optimization"
    ]["stage"] == 2


def test_an_auto_value_the_harness_cannot_fill_is_named(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"params": {"lr": "auto"}}}))
    with pytest.raises(RadialError, match="optimizer.params.lr"):
        training.deepspeed_config(config(2, deepspeed_config=bad))
    with pytest.raises(RadialError, match="invalid training setting zero_stage"):
        config(4)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_and_gathered_weights_reload_with_identical_logits(stage, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = training.train(model, None, lm_batches, lm_loss, config(stage, steps=8), tmp_path / "ckpt")
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert result.history[0]["tokens"] == 48.0  # metrics averaged over the micro-batches

    state = training.gathered_state_dict(result.engine)
    assert set(state) == set(initial)
    assert all(state[k].shape == initial[k].shape for k in state)
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    trained = training.unwrapped_copy(result.engine, make_tiny_model("llama"))
    trained.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = DATA[:2]
    result.engine.eval()
    with torch.no_grad():
        engine_logits = result.engine(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, engine_logits)


def test_zero_2_and_3_follow_the_same_loss_curve(tmp_path):
    curves = {}
    for stage in (2, 3):
        result = training.train(make_tiny_model("llama"), None, lm_batches, lm_loss, config(stage), tmp_path / f"z{stage}")
        curves[stage] = [row["loss"] for row in result.history]
    assert curves[2] == pytest.approx(curves[3], rel=1e-4)


def test_only_the_given_parameters_train(tmp_path):
    model = make_tiny_model("llama")
    head = list(model.lm_head.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = training.train(model, head, lm_batches, lm_loss, config(2, steps=3), tmp_path / "ckpt")
    after = training.gathered_state_dict(result.engine)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight"}
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith("lm_head"))


def test_parameter_groups_get_their_own_learning_rates(tmp_path):
    model = make_tiny_model("llama")
    groups = [{"params": list(model.lm_head.parameters()), "lr": 1e-2}, {"params": list(model.model.norm.parameters())}]
    result = training.train(model, groups, lm_batches, lm_loss, config(2, steps=1, warmup_steps=0), tmp_path / "c")
    rates = sorted({g["initial_lr"] for g in result.engine.optimizer.param_groups})
    assert rates == pytest.approx([5e-3, 1e-2])


def test_resume_from_the_last_checkpoint_retraces_the_uninterrupted_run(tmp_path):
    full = training.train(make_tiny_model("llama"), None, lm_batches, lm_loss, config(2), tmp_path / "full")
    # Simulate a run killed after its step-3 checkpoint, having logged steps 4 and 5.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    shutil.rmtree(partial / "step6")
    (partial / "latest").write_text("step3")
    rows = (partial / training.HISTORY_FILE).read_text().splitlines()
    (partial / training.HISTORY_FILE).write_text("\n".join(rows[:5]) + "\n" + rows[5][:10])  # a torn last line

    resumed = training.train(make_tiny_model("llama", seed=1), None, lm_batches, lm_loss, config(2), partial)
    assert resumed.resumed_from == 3
    assert [row["step"] for row in resumed.history] == list(range(1, 7))
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in full.history], rel=1e-5)
    saved = [json.loads(line) for line in (partial / training.HISTORY_FILE).read_text().splitlines()]
    assert [row["step"] for row in saved] == list(range(1, 7))


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, capsys):
    training.train(make_tiny_model("llama"), None, lm_batches, lm_loss, config(2, steps=3), tmp_path / "c")
    again = training.train(make_tiny_model("llama"), None, lm_batches, lm_loss, config(2, steps=3), tmp_path / "c")
    assert again.resumed_from == 3 and len(again.history) == 3
    changed = training.train(make_tiny_model("llama"), None, lm_batches, lm_loss, config(2, steps=3, lr=1e-3), tmp_path / "c")
    assert changed.resumed_from is None
    assert "starting afresh" in capsys.readouterr().out
    other_input = training.train(
        make_tiny_model("llama"), None, lm_batches, lm_loss, config(2, steps=3, lr=1e-3), tmp_path / "c",
        fingerprint={"labels": "abc"},
    )
    assert other_input.resumed_from is None


def test_batches_are_epoch_shuffles_and_a_pure_function_of_the_step():
    seen = [training.rank_batch_indices(10, 5, step, seed=3) for step in range(4)]
    assert sorted(seen[0] + seen[1]) == list(range(10)) and sorted(seen[2] + seen[3]) == list(range(10))
    assert seen[0] + seen[1] != seen[2] + seen[3]  # reshuffled each epoch
    assert training.rank_batch_indices(10, 5, 2, seed=3) == seen[2]


def test_history_plot_and_wandb_rows(tmp_path):
    class Run:
        def __init__(self):
            self.logged = []

        def log(self, row, step):
            self.logged.append((step, row))

    run = Run()
    result = training.train(make_tiny_model("llama"), None, lm_batches, lm_loss, config(2, steps=3), tmp_path / "c", run=run, desc="lm")
    assert [step for step, _ in run.logged] == [1, 2, 3]
    assert math.isclose(run.logged[0][1]["lm/loss"], result.history[0]["loss"])
    training.plot_history(result.history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
