"""Baselines: ShortGPT pruning, SoFT sorted fine-tuning and exits, DLO-style skip routers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_model
from radial.__main__ import main as radial_main
from radial.variant_folders import VARIANT_INFO
from radial.stages.baselines.shortgpt import kept_path, layers_to_remove
from radial.utils import RadialError, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _profile_dir(tmp_path, influence):
    profile = tmp_path / "profile"
    profile.mkdir()
    metrics = {"block_influence": {"mean": influence, "median": [0.0] * len(influence)}}
    (profile / "summary.json").write_text(json.dumps({"num_layers": len(influence), "metrics": metrics}))
    return profile


# --------------------------------------------------------------------------------------------- ShortGPT


def test_shortgpt_removes_the_lowest_block_influence_layers():
    influence = [0.9, 0.05, 0.30, 0.01, 0.20, 0.05]
    assert layers_to_remove(influence, 1) == [3]
    assert layers_to_remove(influence, 2) == [1, 3]
    assert layers_to_remove(influence, 3) == [1, 3, 5]  # 0.05 twice: both, lower index first
    assert layers_to_remove(influence, 4) == [1, 3, 4, 5]
    assert kept_path(6, [1, 3, 5]) == [0, 2, 4]
    with pytest.raises(RadialError, match="k must be between 1 and 5"):
        layers_to_remove(influence, 6)


def test_shortgpt_stage_writes_a_loadable_pruned_model(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    import radial.routing
    from radial.routing import reference_forward

    profile = _profile_dir(tmp_path, [0.8, 0.02, 0.5, 0.01])  # layers 1 and 3 matter least
    out = tmp_path / "models" / "shortgpt-k2"
    code = radial_main(["shortgpt", "--model", str(tiny_llama_dir), "--profile", str(profile), "--k", "2",
                        "--out", str(out), "--wandb-mode", "disabled"])
    assert code == 0
    info = json.loads((out / VARIANT_INFO).read_text())
    assert info["removed_layers"] == [1, 3] and info["path"] == [0, 2]
    assert (out / "block_influence.png").stat().st_size > 0
    config = json.loads((out / "config.json").read_text())
    assert (out / config["base_model_relative_path"]).resolve() == tiny_llama_dir.resolve()

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(pruned, radial.routing.RoutedForCausalLM)
    base = make_tiny_model("llama")
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference_forward(base, ids, [0, 2]), atol=1e-5, rtol=0)
    assert pruned.radial_executed_layers() == 2


def test_shortgpt_profile_of_another_model_is_refused(tmp_path, tiny_llama_dir, capsys):
    profile = _profile_dir(tmp_path, [0.5] * 6)
    code = radial_main(["shortgpt", "--model", str(tiny_llama_dir), "--profile", str(profile), "--k", "1",
                        "--out", str(tmp_path / "out"), "--wandb-mode", "disabled"])
    assert code == 2
    assert "profiles 6 layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- SoFT


def _truncated(model, depth):
    """A deep copy of `model` that keeps only its first `depth` layers (a sub-model built by hand)."""
    import copy

    sub = copy.deepcopy(model)
    sub.model.layers = sub.model.layers[:depth]
    sub.config.num_hidden_layers = depth
    return sub


def _batch(seed=0, batch=3, seq=10, vocab=320):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[1, 7:] = -100  # a shorter row, padded
    input_ids[1, 7:] = 2
    return {"input_ids": input_ids, "labels": labels, "attention_mask": (labels != -100).long()}


def test_soft_loss_is_the_mean_of_the_sub_model_losses():
    from radial.stages.baselines.soft import ExitOutputs, sorted_loss

    model = make_tiny_model("llama", num_layers=4)
    batch = _batch()
    exits = [1, 3, 4]
    outputs = ExitOutputs(model, exits)
    loss, metrics = sorted_loss(model, batch, outputs)
    by_hand = {}
    for depth in exits:
        sub = _truncated(model, depth)
        by_hand[depth] = sub(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    for depth in exits:
        assert metrics[f"loss_exit{depth}"] == pytest.approx(by_hand[depth].item(), rel=1e-5)
    assert loss.item() == pytest.approx(torch.stack(list(by_hand.values())).mean().item(), rel=1e-5)
    assert len({round(v, 4) for v in metrics.values()}) == 3  # the exits really differ


def test_soft_exits_share_one_norm_and_head():
    from radial.stages.baselines.soft import ExitOutputs, sorted_loss

    model = make_tiny_model("llama", num_layers=4)
    parameters_before = sum(p.numel() for p in model.parameters())
    outputs = ExitOutputs(model, [2, 4])
    loss, _ = sorted_loss(model, _batch(), outputs)
    loss.backward()
    assert sum(p.numel() for p in model.parameters()) == parameters_before  # no extra heads
    # The shared head's gradient is the mean of what each sub-model alone sends it.
    head_grad = model.lm_head.weight.grad.clone()
    expected = torch.zeros_like(head_grad)
    for depth in (2, 4):
        sub = _truncated(model, depth)
        sub.zero_grad()
        batch = _batch()
        sub(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        expected += sub.lm_head.weight.grad / 2
    torch.testing.assert_close(head_grad, expected, atol=1e-6, rtol=1e-4)
    # Layers above the lower exit learn only from the full model; below, from both.
    assert model.model.layers[3].mlp.down_proj.weight.grad.abs().sum() > 0


def test_soft_default_exits_every_eighth_of_the_depth():
    from radial.stages.baselines.soft import resolve_exits

    assert resolve_exits(None, 32) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert resolve_exits(None, 12) == [2, 3, 5, 6, 8, 9, 11, 12]
    assert resolve_exits([3, 6], 12) == [3, 6, 12]  # the full model is always a sub-model
    with pytest.raises(RadialError, match="exit 13 is outside 1..12"):
        resolve_exits([13], 12)


def _confidence_model(threshold, exits=(1, 2)):
    from radial.routing import ConfidenceExitRouter, RoutedForCausalLM

    base = make_tiny_model("llama", num_layers=4)
    return base, RoutedForCausalLM.from_base(base, router=ConfidenceExitRouter(4, list(exits), threshold))


def test_confidence_exit_threshold_zero_stops_at_the_first_exit():
    from radial.routing import reference_forward

    base, routed = _confidence_model(0.0)
    ids = torch.tensor([[5, 9, 14, 3, 7], [8, 8, 1, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(routed(ids, use_cache=False).logits, reference_forward(base, ids, [0]), atol=1e-5, rtol=0)
    assert routed.radial_executed_layers() == 1


def test_confidence_exit_above_one_is_dense():
    _, routed = _confidence_model(1.01)
    ids = torch.tensor([[5, 9, 14, 3, 7], [8, 8, 1, 4, 6]])
    base = make_tiny_model("llama", num_layers=4)
    with torch.no_grad():
        torch.testing.assert_close(routed(ids, use_cache=False).logits, base(ids).logits, atol=1e-5, rtol=0)
    assert routed.radial_executed_layers() == 4


def test_confidence_exit_decides_per_example_and_keeps_the_depth_while_generating():
    from radial.routing import reference_forward

    base, routed = _confidence_model(0.5)
    router = routed.router
    ids = torch.tensor([[5, 9, 14, 3, 7], [8, 8, 1, 4, 6], [11, 12, 13, 14, 15]])
    # Make the exit head confident for exactly one example by reading its hidden state directly.
    with torch.no_grad():
        hidden_1 = reference_forward_hidden(base, ids, 1)
        confidence = router.confidence(hidden_1, None)
    router.threshold = float(confidence.sort().values[1:].mean())  # between the lowest and the others
    expected_depth = [1 if c >= router.threshold else None for c in confidence.tolist()]
    assert expected_depth.count(1) in (1, 2)
    with torch.no_grad():
        out = routed(ids, use_cache=False).logits
        for row, depth in enumerate(expected_depth):
            if depth == 1:
                torch.testing.assert_close(out[row], reference_forward(base, ids[row : row + 1], [0])[0], atol=1e-5, rtol=0)
        generated = routed.generate(ids, max_new_tokens=4, do_sample=False)
        uncached = routed.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(generated, uncached)


def reference_forward_hidden(base, ids, depth):
    """Hidden states leaving layer depth-1 (no final norm), via a forward hook on the stock model."""
    kept = {}
    handle = base.model.layers[depth - 1].register_forward_hook(lambda m, a, o: kept.update(h=o))
    base(ids)
    handle.remove()
    return kept["h"]


# --------------------------------------------------------------------------------------------- DLO


def test_dlo_labels_skip_the_least_changing_pairs_up_to_capacity():
    from radial.stages.baselines.dlo import skip_labels

    generator = torch.Generator().manual_seed(0)
    cosine = torch.rand(4, 2, 6, generator=generator)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False  # padding
    cosine[:, 1, 4:] = 2.0  # padding looks least-changing, yet must never be labelled
    labels = skip_labels(cosine, real, 0.25)
    num_real = 4 * int(real.sum())
    assert int(labels.sum()) == int(0.25 * num_real)
    assert not labels[:, ~real].any()
    mask = real.unsqueeze(0).expand_as(cosine)
    assert cosine[labels].min() >= cosine[mask & ~labels].max()  # skipped pairs changed least
    assert int(skip_labels(cosine, real, 0.1).sum()) == int(0.1 * num_real)
    assert not skip_labels(cosine, real, 0.01).any()  # floor(0.01 * 40) = 0


@pytest.mark.parametrize("skip", ["mlp", "layer"])
def test_dlo_loss_trains_routers_toward_the_labels(skip):
    from radial.stages.baselines.dlo import LayerTraffic, dlo_loss
    from radial.routing import GateTokenRouter, RoutedForCausalLM

    base = make_tiny_model("llama", num_layers=4)
    routed = RoutedForCausalLM.from_base(base, router=GateTokenRouter(4, 32), token_skip=skip).train()
    traffic = LayerTraffic(routed, routed.router, skip)
    with routed.token_execution_mode("reference"):
        loss, metrics = dlo_loss(routed, _batch(), traffic, capacity=0.5, router_loss_weight=1.0)
        assert metrics["skip_fraction"] == 0.0  # the untrained gate runs everything
        initial_router_loss = metrics["router_loss"]
        assert initial_router_loss > 0
        loss.backward()
        assert routed.router.gates[0].bias.grad is not None and routed.router.gates[0].bias.grad.abs() > 0
        optimizer = torch.optim.SGD(routed.router.parameters(), lr=5.0)
        for _ in range(30):
            optimizer.zero_grad()
            loss, metrics = dlo_loss(routed, _batch(), traffic, capacity=0.5, router_loss_weight=1.0)
            loss.backward()
            optimizer.step()
    assert 0.1 < metrics["skip_fraction"] < 0.9
    assert metrics["router_loss"] < initial_router_loss - 0.01
    # Labels are 50 % skip; the MLP branch's cosine is harder to read off the layer's input.
    assert metrics["label_agreement"] > (0.6 if skip == "layer" else 0.52)


def test_dlo_training_runs_the_top_share_of_real_tokens_and_inference_the_gate():
    from radial.stages.baselines.dlo import TopKDuringTraining
    from radial.routing import GateTokenRouter

    gate = GateTokenRouter(2, 8, init_bias=0.0)
    torch.nn.init.normal_(gate.gates[1].weight, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    topk = TopKDuringTraining(gate, capacity=0.25).train()
    run = topk(1, hidden, mask) > 0
    real = mask.bool()
    assert int(run[real].sum()) == math.ceil(int(real.sum()) * 0.75)
    raw = gate(1, hidden, mask)
    assert raw[real & run].min() > raw[real & ~run].max()  # the highest logits run
    assert torch.equal(topk.eval()(1, hidden, mask), raw)
    fresh = TopKDuringTraining(GateTokenRouter(2, 8, init_bias=1.0), capacity=0.25).train()  # every logit equal
    assert int((fresh(0, hidden, mask) > 0)[real].sum()) == math.ceil(int(real.sum()) * 0.75)


# --------------------------------------------------------------------------------------------- sweeps


def _config(**baselines):
    config = {
        "model": {"name_or_path": None, "embedded": {"layers": 12}},
        "evaluate": {"variants": ["dense", "shortgpt", "soft", "dlo"]},
        "baselines": {"shortgpt": {"k": [2, 4]}, "soft": {"exits": [6, 12], "thresholds": [0.9, 1.0]},
                      "dlo": {"capacity": [0.25]}},
    }
    config["baselines"].update(baselines)
    return config


def test_sweep_lists_expand_to_variants():
    from radial.variants import evaluation_variants, is_baseline_variant

    variants = evaluation_variants(_config())
    assert variants == ["dense", "shortgpt-k2", "shortgpt-k4", "soft-exit6", "soft-exit12", "soft-conf0.9",
                        "soft-conf1", "dlo-c0.25"]
    assert all(is_baseline_variant(v) for v in variants[1:]) and not is_baseline_variant("dense")
    # one more value, one more variant; the others keep their names (and so their cached outputs)
    more = evaluation_variants(_config(shortgpt={"k": [2, 4, 6]}))
    assert set(more) - set(variants) == {"shortgpt-k6"}


def test_soft_exits_default_to_every_eighth_and_are_checked():
    from radial.variants import evaluation_variants, soft_exits

    assert soft_exits(_config(soft={"exits": None, "thresholds": []})) == [2, 3, 5, 6, 8, 9, 11, 12]
    with pytest.raises(RadialError, match="baselines.soft.exits: exit 13 exceeds"):
        soft_exits(_config(soft={"exits": [13], "thresholds": []}))
    hub = _config(soft={"exits": None, "thresholds": []}) | {"model": {"name_or_path": "Qwen/Qwen2.5-3B"}}
    with pytest.raises(RadialError, match="baselines.soft.exits: list the exit depths"):
        soft_exits(hub)
    with pytest.raises(RadialError, match="evaluate.variants: unknown family 'pruned'"):
        evaluation_variants(_config() | {"evaluate": {"variants": ["pruned"]}})


# --------------------------------------------------------------------------------------------- stages end to end


@pytest.fixture
def finetune_data(tmp_path):
    rows = [
        {"id": f"synthetic/train/{i}", "task": "synthetic", "split": "train", "question": f"{i % 7}+{i % 5}=",
         "answer": str(i % 7 + i % 5), "level": 1}
        for i in range(200)
    ]
    write_jsonl(tmp_path / "data" / "synthetic" / "train.jsonl", rows)
    return tmp_path / "data"



def test_fine_tuning_batches_hold_one_question_per_row_like_pre_training(tiny_tokenizer, finetune_data):
    from radial.corpus import FinetuneBatches

    batches = FinetuneBatches(tiny_tokenizer, finetune_data, 4, 32, 0.0, seed=0, synthetic_batch_size=6)
    for micro_step in range(5):
        batch = batches(micro_step)
        assert batch["input_ids"].shape[0] == 6
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            text = tiny_tokenizer.decode(ids[mask.bool()])
            assert text.count("=") == 1 and text[0].isdigit() and text.endswith("\n")  # one question from position 0
    assert torch.equal(batches(3)["input_ids"], FinetuneBatches(
        tiny_tokenizer, finetune_data, 4, 32, 0.0, seed=0, synthetic_batch_size=6)(3)["input_ids"])  # replayable

@pytest.mark.slow
def test_soft_stage_trains_nested_exits_and_makes_its_variants(tmp_path, tiny_llama_dir, finetune_data):
    from transformers import AutoModelForCausalLM

    from radial.routing import reference_forward

    soft = tmp_path / "models" / "soft"
    common = ["--wandb-mode", "disabled", "--seed", "0"]
    assert radial_main(["soft", "--model", str(tiny_llama_dir), "--data-dir", str(finetune_data), "--exits", "2",
                        "--out", str(soft), "--steps", "4", "--batch-size", "4", "--seq-len", "32",
                        "--checkpoint-every", "2", "--zero-stage", "1", *common]) == 0
    info = json.loads((soft / VARIANT_INFO).read_text())
    assert info["exits"] == [2, 4] and info["train"]["steps"] == 4
    assert set(info["train"]["last"]) == {"loss", "loss_exit2", "loss_exit4"}
    assert not (tmp_path / "models" / "soft.checkpoints").exists()  # removed once the model is complete
    trained = AutoModelForCausalLM.from_pretrained(soft, dtype=torch.float32)
    before = make_tiny_model("llama")
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)

    exit2, conf = tmp_path / "models" / "soft-exit2", tmp_path / "models" / "soft-conf0"
    assert radial_main(["soft-exit", "--model", str(soft), "--depth", "2", "--out", str(exit2), *common]) == 0
    assert radial_main(["soft-exit", "--model", str(soft), "--threshold", "0", "--out", str(conf), *common]) == 0
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        expected = reference_forward(trained, ids, [0, 1])
        for folder in (exit2, conf):  # threshold 0: every example stops at the first (only) early exit, 2
            variant = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            torch.testing.assert_close(variant(ids, use_cache=False).logits, expected, atol=1e-5, rtol=0)
            assert variant.radial_executed_layers() == 2
    assert json.loads((conf / VARIANT_INFO).read_text())["exits"] == [2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, flags, other_flags, last_call",
    [
        ("soft", ["--exits", "2"], ["--exits", "3"], "unwrapped_copy"),
        ("dlo", ["--capacity", "0.25"], ["--capacity", "0.5"], "gathered_state_dict"),
    ],
)
def test_interrupted_fine_tuning_resumes_only_under_the_same_flags_and_data(
    tmp_path, tiny_llama_dir, finetune_data, monkeypatch, capsys, stage, flags, other_flags, last_call
):
    from radial import training

    def killed_after_training(*args, **kwargs):
        raise RuntimeError("killed after training")

    monkeypatch.setattr(training, last_call, killed_after_training)  # the checkpoints stay, as after a kill
    out = tmp_path / "models" / stage

    def run(stage_flags):
        with pytest.raises(RuntimeError, match="killed after training"):
            radial_main([stage, "--model", str(tiny_llama_dir), "--data-dir", str(finetune_data), "--out", str(out),
                         "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--checkpoint-every", "1",
                         "--wandb-mode", "disabled", "--seed", "0", *stage_flags])
        return capsys.readouterr().out

    run(flags)
    assert (tmp_path / "models" / f"{stage}.checkpoints" / "latest").is_file()
    assert "resumed from" in run(flags)
    changed_flags = run(other_flags)
    assert "starting afresh" in changed_flags and "resumed from" not in changed_flags
    with open(finetune_data / "synthetic" / "train.jsonl", "a") as f:
        f.write(json.dumps({"id": "synthetic/train/new", "question": "1+1=", "answer": "2", "level": 1}) + "\n")
    changed_data = run(other_flags)
    assert "starting afresh" in changed_data and "resumed from" not in changed_data


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["gate", "topk"])
def test_dlo_stage_skips_its_capacity_and_saves_the_fine_tuned_base(selection, tmp_path, tiny_llama_dir, finetune_data):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "models" / "dlo-c0.25"
    assert radial_main(["dlo", "--model", str(tiny_llama_dir), "--data-dir", str(finetune_data), "--capacity", "0.25",
                        "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "0.01",
                        "--train-selection", selection, "--wandb-mode", "disabled"]) == 0
    info = json.loads((out / VARIANT_INFO).read_text())
    assert info["train_selection"] == selection
    assert info["skip_fraction_calibrated"] == pytest.approx(0.25, abs=0.1)
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_relative_path"] == "base" and config["budget"]["skip_bias"] == info["skip_bias"]
    dlo = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert dlo.config.routing_mode == "token"
    assert (dlo.config.token_skip, dlo.config.token_score_gap) == ("mlp", 0.05)  # the authors' defaults
    assert dlo.token_execution == "sparse"
    from radial.corpus import FinetuneBatches
    from transformers import AutoTokenizer

    batch = FinetuneBatches(
        AutoTokenizer.from_pretrained(out), finetune_data, 4, 32, 0.0, seed=0, synthetic_batch_size=4
    )(100)
    with torch.no_grad():
        dlo(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    assert 0 < dlo.radial_executed_layers() < 4
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    assert not torch.equal(base.lm_head.weight, make_tiny_model("llama").lm_head.weight)  # the LM was fine-tuned too
