"""Distill stage: the sequential (dense) model into a token-routed radial student, under DeepSpeed ZeRO.

    python -m radial distill --model results/embedded/models/dense --data-dir results/data \\
        --out results/embedded/models/radial

The student is the teacher's own layers plus a token router (`GateTokenRouter`: per layer a
linear gate on the hidden state of each token; logit > 0 runs the layer for the token, otherwise
its hidden state passes through unchanged). It starts as an exact copy of the teacher (the gates
start open) and learns, on the text the base model was pre-trained on, to

    match the teacher's next-token distribution   T^2 KL(p_teacher^T || p_student^T) per real token
    (optionally) its final hidden states          hidden_weight * MSE of the final-norm outputs
    run `target_fraction` of the layers per token compute_weight * (executed fraction - target)^2

Routing is hard in the forward pass also while training, exactly as at inference; the gates get
gradients through the straight-through estimator (RoutedForCausalLM.straight_through_token_gates):
value = the 0/1 decision, gradient = that of sigmoid(logit). The compute penalty is on those
gates, so it sees the depth the student really runs. The layers fine-tune at --lr, the gates at
--router-lr (they start from zero weights and must move fast); --no-train-layers trains gates only.

Keys and values of skipped tokens. A token that skips layer l still writes keys and values at
layer l, computed by the layer's own attention projections from the hidden state the token
carries into layer l (its state after the layers it did run); later tokens attend to them as in
the dense model. This is FlexiDepth's choice (arXiv 2503.23798) over the alternatives (leaving a
hole in the cache, which changes the attention pattern per token, or copying the previous layer's
entry). The same rule holds in training, in uncached inference and in cached decoding, so cached
generation equals uncached generation (tests check it) and the student is trained exactly as it
runs. Training runs the reference execution (every token computed, then selected: the
straight-through gradient needs every token's layer output); at inference the student computes
each layer for its running tokens only (radial.routing.sparse), so the skipped share is saved.
With --reuse (radial-reuse) the gates sit on token slots, a second slot for each reusable layer; at
such a slot only the tokens that take it leave keys and values (see "Reuse" in
radial.routing.model), so a reuse is paid by those who take it.

Output: a routed model folder (routing config, router.safetensors, the fine-tuned layers under
base/ as safetensors via save_pretrained, tokenizer) that loads with
`AutoModelForCausalLM.from_pretrained` after `import radial.routing`, plus `training.json`,
`curves.png` and `layers.png` (share of tokens each layer runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from radial import settings, training
from radial.corpus import add_batching_arguments
from radial.utils import RadialError

INFO_FILE = "training.json"
HELD_OUT_BATCHES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_path_argument(parser, "model", "the sequential teacher (HF model folder)")
    settings.add_path_argument(parser, "data_dir", "normalized data (synthetic + benchmark train splits)")
    settings.add_path_argument(parser, "out", "student model folder to write (atomically)")
    add_batching_arguments(parser, "distill")
    for name in ("target_fraction", "temperature", "hidden_weight", "compute_weight", "router_lr", "init_bias",
                 "train_layers"):
        settings.add_setting(parser, f"distill.{name}")
    parser.add_argument("--reuse", action="store_true",
                        help="Radial routing with reuse (variant radial-reuse): a token may run a layer twice")  # fmt: skip
    settings.add_setting(parser, "distill.reuse_layers")
    settings.add_setting(parser, "distill.max_depth")
    settings.add_threads_argument(parser)
    training.add_train_arguments(parser, "distill")
    settings.add_common_arguments(parser)


# ---------------------------------------------------------------------------------------------
# Loss


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, real: torch.Tensor, temperature: float):
    """T^2 KL(teacher_T || student_T), mean over the real tokens (real: [batch, seq] bool)."""
    s = torch.log_softmax(student_logits.float()[real] / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float()[real] / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def executed_fraction(gates: list[torch.Tensor], real: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
    """Mean over real tokens of layers run per layer of the model (straight-through: value exact, gradient
    soft). One gate per token slot: with reuse there are more slots than layers, and a reused layer counts twice."""
    if not gates:
        raise RadialError("no token gates were recorded (is the student in token routing mode?)")
    per_token = torch.stack(gates).sum(0) / (num_layers or len(gates))  # [batch, seq]
    return per_token[real].mean()


def token_slots(num_layers: int, reuse: bool, reuse_layers: list[int] | None) -> list[int] | None:
    """The student's token path: None without reuse, else every layer once plus a second slot for each
    of `reuse_layers` (None: every layer)."""
    if not reuse:
        return None
    reused = range(num_layers) if reuse_layers is None else sorted(set(reuse_layers))
    bad = [layer for layer in reused if not 0 <= layer < num_layers]
    if bad:
        raise RadialError(f"--reuse-layers: layer {bad[0]} is not one of the model's {num_layers} layers (0-{num_layers - 1})")
    return sorted([*range(num_layers), *reused])


def slot_biases(path: list[int] | None, num_layers: int, init_bias: float) -> float | list[float]:
    """Gates start open on a layer's first slot and closed on its reuse slot: the untrained student is the teacher."""
    if path is None:
        return init_bias
    return [init_bias if i == 0 or path[i - 1] != layer else -abs(init_bias) for i, layer in enumerate(path)]


class FinalHidden:
    """Keeps the hidden state the LM head reads (after the final norm and any projection), in any family."""

    def __init__(self, lm_head: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = lm_head.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self._handle.remove()


class Distiller:
    """loss_fn for the harness: the student (through the engine) against the frozen teacher."""

    def __init__(self, teacher: nn.Module, args: argparse.Namespace) -> None:
        self.teacher = teacher
        self.args = args
        self.teacher_hidden = FinalHidden(teacher.get_output_embeddings())
        self.student_hidden: FinalHidden | None = None

    def __call__(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        student = engine.module
        if self.student_hidden is None:
            self.student_hidden = FinalHidden(student.parts.lm_head)
        real = batch["attention_mask"].bool()
        if next(self.teacher.parameters()).device != batch["input_ids"].device:
            self.teacher.to(batch["input_ids"].device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with student.straight_through_token_gates() as gates:
            student_logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        kl = distillation_kl(student_logits, teacher_logits, real, self.args.temperature)
        fraction = executed_fraction(gates, real, student.num_layers)
        penalty = (fraction - self.args.target_fraction) ** 2
        loss = kl + self.args.compute_weight * penalty
        metrics = {"kl": kl.item(), "executed_fraction": fraction.item()}
        if self.args.hidden_weight > 0:
            hidden = nn.functional.mse_loss(
                self.student_hidden.value.float()[real], self.teacher_hidden.value.float()[real]
            )
            loss = loss + self.args.hidden_weight * hidden
            metrics["hidden_mse"] = hidden.item()
        with torch.no_grad():
            labels = batch["labels"]
            metrics["ce"] = nn.functional.cross_entropy(
                student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            ).item()
        return loss, metrics


def with_padding_mask(batches):
    """The fine-tuning batches with attention_mask = every token but the right padding.

    (Their labels are -100 on prompt tokens too, which carry no loss but are real context.)
    """

    def batch_for_step(micro_step: int) -> dict:
        batch = dict(batches(micro_step))
        batch["attention_mask"] = (batch["input_ids"] != batches.pad_id).long()
        return batch

    return batch_for_step


@torch.no_grad()
def held_out_metrics(student, teacher, batches: list[dict], temperature: float) -> dict:
    """KL to the teacher, executed fraction (hard, as at inference) and per-layer run shares."""
    student.eval()
    device = student.parts.lm_head.weight.device
    kl_sum, tokens, layer_runs = 0.0, 0, None
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        real = batch["attention_mask"].bool()
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with student.straight_through_token_gates() as gates:
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        count = int(real.sum())
        kl_sum += distillation_kl(student_logits, teacher_logits, real, temperature).item() * count
        tokens += count
        runs = torch.stack([g[real].sum() for g in gates]).cpu()
        layer_runs = runs if layer_runs is None else layer_runs + runs
    shares = (layer_runs / tokens).tolist()  # per token slot: per layer, or with reuse per (layer, visit)
    return {"kl": kl_sum / tokens, "executed_fraction": sum(shares) / student.num_layers, "layer_share": shares}


@torch.no_grad()
def cache_consistency(student, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> bool:
    """Greedy generation with the KV cache equals generation without it, on a few prompts."""
    student.eval()
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(student.parts.lm_head.weight.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = student.generate(**encoded, use_cache=True, **kwargs)
    uncached = student.generate(**encoded, use_cache=False, **kwargs)
    return bool(torch.equal(cached, uncached))


# ---------------------------------------------------------------------------------------------
# The stage


def main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from radial import tracking
    from radial.variant_folders import write_variant_folder
    from radial.corpus import FinetuneBatches
    from radial.finetuning import load_for_finetuning
    from radial.layers import find_decoder_layers
    from radial.routing import GateTokenRouter, RoutedForCausalLM, RouterBudget
    from radial.utils import read_jsonl

    cfg = training.start_stage(args)
    checkpoint_dir = training.checkpoint_dir_for(args)
    student_base, tokenizer = load_for_finetuning(args.model)
    teacher_dtype = torch.bfloat16 if training.use_bf16(cfg.bf16) else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=teacher_dtype).eval().requires_grad_(False)
    num_layers = len(find_decoder_layers(student_base))
    path = token_slots(num_layers, args.reuse, args.reuse_layers)
    biases = slot_biases(path, num_layers, args.init_bias)
    budget = RouterBudget(max_layers=args.max_depth) if args.reuse and args.max_depth else None
    slots = len(path) if path else num_layers
    router = GateTokenRouter(slots, student_base.config.hidden_size, init_bias=biases)
    student = RoutedForCausalLM.from_base(student_base, router=router, token_path=path, budget=budget).train()
    groups = [{"params": list(router.parameters()), "lr": args.router_lr}]
    if args.train_layers:
        groups.append({"params": list(student_base.parameters()), "lr": cfg.lr})
    batches = with_padding_mask(FinetuneBatches.from_args(tokenizer, args))
    distiller = Distiller(teacher, args)
    # Held out: the micro-batches right after the ones training uses.
    held_out = [batches(cfg.steps * cfg.grad_accum + i) for i in range(HELD_OUT_BATCHES)]

    def evaluate(engine) -> dict[str, float]:
        metrics = held_out_metrics(engine.module, teacher, held_out[:2], args.temperature)
        engine.module.train()
        return {"kl": metrics["kl"], "executed_fraction": metrics["executed_fraction"]}

    fingerprint = training.run_fingerprint(
        args, "target_fraction", "temperature", "hidden_weight", "compute_weight", "router_lr", "init_bias",
        "train_layers", "reuse", "reuse_layers", "max_depth",
    )
    with tracking.stage_run("distill", args, config={"num_layers": num_layers, "train_config": vars(cfg)}) as run:
        result = training.train(
            student, groups, batches, distiller, cfg, checkpoint_dir, run=run, desc="distill",
            eval_fn=evaluate, fingerprint=fingerprint,
        )
        state = training.gathered_state_dict(result.engine)  # collective under ZeRO-3: every rank
        if training.rank() != 0:
            return 0
        device = result.engine.device
        trained_base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        trained_base.load_state_dict(student.base_state_dict(state))
        trained_router = GateTokenRouter(slots, student_base.config.hidden_size, init_bias=biases)
        trained_router.load_state_dict({k.removeprefix("router."): v for k, v in state.items() if k.startswith("router.")})
        final = RoutedForCausalLM.from_base(trained_base, router=trained_router, token_path=path, budget=budget)
        final = final.to(device).eval()
        final.config.base_model_name_or_path = str(args.model)
        teacher.to(device)

        held = held_out_metrics(final, teacher, held_out, args.temperature)
        test_file = Path(args.data_dir) / "synthetic" / "test.jsonl"
        prompts = [row["question"] for row in read_jsonl(test_file)[:8]] if test_file.is_file() else ["1+2="]
        consistent = cache_consistency(final, tokenizer, prompts)
        if not consistent:
            raise RadialError("the student's cached generation differs from its uncached generation")
        summary = {
            "num_layers": num_layers,
            "target_fraction": args.target_fraction,
            "held_out": {**held, "executed_layers": held["executed_fraction"] * num_layers},
            "cache_equals_no_cache": consistent,
            "final_train": {k: v for k, v in result.history[-1].items() if k not in ("step", "seconds")},
            "resumed_from_step": result.resumed_from,
            "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
            "loss": {k: v for k, v in fingerprint.items() if k not in ("model", "data")},
            "history": result.history,
        }
        info = {
            "method": "radial-reuse" if path else "radial",
            "description": f"token-routed student distilled from the dense model, target {args.target_fraction:.0%} "
            f"of layers per token (held-out: {held['executed_fraction'] * num_layers:.2f} of {num_layers})"
            + (f"; a token may run {len(path) - num_layers} of its layers twice (token slots {path}), "
               f"at most {args.max_depth or len(path)} runs" if path else ""),  # fmt: skip
            "base_model": str(args.model),
            "num_layers": num_layers,
        }

        def extra(tmp: Path) -> None:
            if args.train_layers:
                trained_base.save_pretrained(tmp / "base")
                tokenizer.save_pretrained(tmp / "base")
                final.config.base_model_name_or_path = str(tmp / "base")
            (tmp / INFO_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            keys = [k for k in ("loss", "kl", "executed_fraction", "hidden_mse", "ce", "val_kl", "val_executed_fraction")
                    if any(k in row for row in result.history)]
            training.plot_history(result.history, tmp / "curves.png", keys=keys, title="radial distillation")
            plot_layer_share(held["layer_share"], args.target_fraction, tmp / "layers.png")

        write_variant_folder(final, args.model, args.out, info, extra=extra)
        run.summary.update({"held_out/kl": held["kl"], "held_out/executed_layers": held["executed_fraction"] * num_layers})
        tracking.log_image(run, "distill/curves", args.out / "curves.png")
        tracking.log_image(run, "distill/layers", args.out / "layers.png")
        tracking.log_artifact(run, f"{args.run_name}-radial", "model", [args.out])
    training.discard_checkpoints(checkpoint_dir)
    print(
        f"distill: held-out KL {held['kl']:.4f}, {held['executed_fraction'] * num_layers:.2f} of {num_layers} layers "
        f"per token (target {args.target_fraction * num_layers:.2f}), cache == no cache: {consistent} -> {args.out}"
    )
    return 0


def plot_layer_share(shares: list[float], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(shares) + 2), 3.2))
    ax.bar(range(len(shares)), shares, color="C0")
    ax.axhline(target, color="C3", linestyle="--", linewidth=1, label=f"target mean {target:.2f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens run")
    ax.set_title("radial student: tokens executing each layer (held out)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
