"""DLO-style token skipping (Tan et al. 2024, "Dynamic Layer Operation", arXiv 2407.11030).

    python -m radial dlo --model results/models/dense --data-dir results/data --capacity 0.25 \\
        --out results/models/dlo-c0.25

Every layer gets a router, Linear(d, 1) followed by a sigmoid, on the hidden state of each token
entering the layer: p > 0.5 runs the layer for the token, otherwise the token's hidden state
passes through unchanged (radial's GateTokenRouter, used in the routed model's token mode).

The routers are supervised by how little a layer changes a token: in every training batch the
cosine similarity cos(x_in, x_out) between a token's hidden state entering and leaving each
layer is computed for all (layer, token) pairs; the `capacity` share of pairs with the highest
similarity, pooled across all layers, is labelled skip and the rest execute. The model is
fine-tuned with routing switched on, on LM loss + router_loss_weight · BCE(router, labels), with
the shared DeepSpeed harness and the same data as SoFT. Afterwards the routers' threshold is
calibrated on held-out fine-tuning batches so that the model skips `capacity` of its (layer,
token) pairs, the capacity it was trained for, and it is evaluated there.

The routed model's token mode is a reference implementation: a skipped token still gets keys and
values at the layer (FlexiDepth's choice, so cached decoding stays exact), and the layer is
computed for every token and then selected, so DLO here shows accuracy against executed layers
but no wall-time gain (see radial.routing.routers).

The output folder holds the fine-tuned base model under `base/` and, beside it, the routed config
with the router weights and its calibrated threshold (`budget.skip_bias`).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from radial import settings, tracking, training
from radial.variant_folders import write_variant_folder
from radial.corpus import FinetuneBatches
from radial.finetuning import add_finetune_arguments, load_for_finetuning, training_summary
from radial.layers import find_decoder_layers
from radial.settings import add_common_arguments
from radial.utils import RadialError

CALIBRATION_BATCHES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_finetune_arguments(parser)
    settings.add_setting(
        parser, "baselines.dlo.capacity", type=float, nargs=None, default=None, required=True,
        help="share of (layer, token) pairs labelled skip (0 < capacity < 1); one value of the config's sweep",
    )
    settings.add_setting(parser, "baselines.dlo.router_loss_weight")
    parser.add_argument(
        "--init-bias", type=float, default=1.0, help="initial router logit (>0: every token runs every layer at first)"
    )
    add_common_arguments(parser)


def skip_labels(cosine: torch.Tensor, real: torch.Tensor, capacity: float) -> torch.Tensor:
    """Skip (True) for the floor(capacity · N) (layer, token) pairs of highest cosine among the N real ones.

    cosine: [layers, batch, seq]; real: [batch, seq] bool (False on padding, which is never labelled
    skip). The pairs are ranked across all layers together, as DLO does.
    """
    mask = real.unsqueeze(0).expand_as(cosine)
    num_skip = math.floor(capacity * int(mask.sum()))
    labels = torch.zeros_like(mask)
    if num_skip == 0:
        return labels
    scores = cosine.masked_fill(~mask, -math.inf).flatten()
    labels.view(-1)[scores.topk(num_skip).indices] = True
    return labels


class LayerTraffic:
    """Hooks that keep, per layer and forward, the router's logits and cos(layer input, layer output)."""

    def __init__(self, routed: nn.Module) -> None:
        self.logits: dict[int, torch.Tensor] = {}
        self.cosine: dict[int, torch.Tensor] = {}
        self._handles = [routed.router.register_forward_hook(self._keep_logits)]
        for index, layer in enumerate(find_decoder_layers(routed)):
            self._handles.append(layer.register_forward_hook(self._keep_cosine(index), with_kwargs=True))

    def _keep_logits(self, module, args, output) -> None:
        self.logits[int(args[0])] = output

    def _keep_cosine(self, index: int):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            with torch.no_grad():
                self.cosine[index] = nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)

        return hook

    def clear(self) -> None:
        self.logits.clear()
        self.cosine.clear()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and cosines as [layers, batch, seq]."""
        layers = sorted(self.logits)
        if layers != sorted(self.cosine):
            raise RadialError("DLO: router calls and layer calls do not match (is the model in token mode?)")
        return torch.stack([self.logits[i] for i in layers]), torch.stack([self.cosine[i] for i in layers])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def dlo_loss(model_call, batch: dict, traffic: LayerTraffic, capacity: float, router_loss_weight: float, skip_bias=0.0):
    """LM loss of the routed forward + weighted router BCE against the cosine skip labels."""
    traffic.clear()
    out = model_call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits, cosine = traffic.stacked()
    real = batch["attention_mask"].bool()
    skip = skip_labels(cosine, real, capacity)
    mask = real.unsqueeze(0).expand_as(logits)
    router_loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float()[mask], (~skip)[mask].float()  # target 1 = execute
    )
    skipped = (logits.detach() - skip_bias <= 0)[mask]
    metrics = {
        "lm_loss": out.loss.item(),
        "router_loss": router_loss.item(),
        "skip_fraction": skipped.float().mean().item(),
        "label_agreement": (skipped == skip[mask]).float().mean().item(),
    }
    return out.loss + router_loss_weight * router_loss, metrics


@torch.no_grad()
def calibrate_skip_bias(routed, traffic: LayerTraffic, batches, steps: range, capacity: float) -> float:
    """The threshold on router logits below which `capacity` of the real (layer, token) pairs fall."""
    collected = []
    for step in steps:
        batch = batches(step)
        traffic.clear()
        routed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits, _ = traffic.stacked()
        collected.append(logits[batch["attention_mask"].bool().unsqueeze(0).expand_as(logits)].float())
    return float(torch.quantile(torch.cat(collected), capacity))


@torch.no_grad()
def measured_skip_fraction(routed, traffic: LayerTraffic, batches, steps: range) -> float:
    skipped = total = 0
    for step in steps:
        batch = batches(step)
        traffic.clear()
        routed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits, _ = traffic.stacked()
        mask = batch["attention_mask"].bool().unsqueeze(0).expand_as(logits)
        skipped += int((logits - routed.budget.skip_bias <= 0)[mask].sum())
        total += int(mask.sum())
    return skipped / max(1, total)


def main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from radial.routing import GateTokenRouter, RoutedForCausalLM, RouterBudget

    cfg = training.start_stage(args)
    base, tokenizer = load_for_finetuning(args.model)
    num_layers = len(find_decoder_layers(base))
    router = GateTokenRouter(num_layers, base.config.hidden_size, init_bias=args.init_bias)
    routed = RoutedForCausalLM.from_base(base, router=router).train()
    batches = FinetuneBatches.from_args(tokenizer, args)
    traffic = LayerTraffic(routed)
    checkpoint_dir = training.checkpoint_dir_for(args)

    with tracking.stage_run("dlo", args, config={"num_layers": num_layers}) as run:
        result = training.train(
            routed,
            None,
            batches,
            lambda engine, batch: dlo_loss(engine, batch, traffic, args.capacity, args.router_loss_weight),
            cfg,
            checkpoint_dir,
            run=run,
            desc="dlo",
            fingerprint=training.run_fingerprint(args, "capacity", "router_loss_weight", "init_bias"),
        )
        traffic.remove()
        state = training.gathered_state_dict(result.engine)
        trained_base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        trained_base.load_state_dict({k: v for k, v in state.items() if not k.startswith("router.")})
        trained_router = GateTokenRouter(num_layers, base.config.hidden_size, init_bias=args.init_bias)
        trained_router.load_state_dict({k.removeprefix("router."): v for k, v in state.items() if k.startswith("router.")})
        final = RoutedForCausalLM.from_base(trained_base, router=trained_router).eval()

        # Held-out batches: the micro-steps right after the ones training used.
        held_out = range(cfg.steps * cfg.grad_accum, cfg.steps * cfg.grad_accum + CALIBRATION_BATCHES)
        traffic = LayerTraffic(final)
        skip_at_half = measured_skip_fraction(final, traffic, batches, held_out)
        skip_bias = calibrate_skip_bias(final, traffic, batches, held_out, args.capacity)
        final.set_budget(RouterBudget(skip_bias=skip_bias))
        skip_calibrated = measured_skip_fraction(final, traffic, batches, held_out)
        traffic.remove()

        keys = ["loss", "lm_loss", "router_loss", "skip_fraction", "label_agreement"]
        summary = training_summary(result.history, keys)
        info = {
            "method": "dlo",
            "description": f"DLO-style skip: per-layer linear routers trained on cosine labels at capacity "
            f"{args.capacity:g} during {cfg.steps} fine-tuning steps, threshold calibrated to skip "
            f"{args.capacity:.0%} of layer-token pairs",
            "base_model": str(args.model),
            "num_layers": num_layers,
            "capacity": args.capacity,
            "router_loss_weight": args.router_loss_weight,
            "skip_bias": skip_bias,
            "skip_fraction_at_p_half": skip_at_half,
            "skip_fraction_calibrated": skip_calibrated,
            "train": summary | {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
                                "seq_len": args.seq_len, "zero_stage": cfg.zero_stage},
        }

        def save_base(tmp: Path) -> None:
            trained_base.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            training.plot_history(result.history, tmp / "training.png", keys=keys, title="DLO-style fine-tuning")
            final.config.base_model_name_or_path = str(tmp / "base")

        write_variant_folder(final, args.model, args.out, info, extra=save_base)
        run.summary.update({"skip_bias": skip_bias, "skip_fraction_calibrated": skip_calibrated})
        tracking.log_image(run, "training", args.out / "training.png")
        tracking.log_artifact(run, f"{args.run_name}-dlo-c{args.capacity:g}", "model", [args.out])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is complete; a later run must not resume it
    print(
        f"DLO capacity {args.capacity:g}: skip share {skip_at_half:.3f} at p=0.5, {skip_calibrated:.3f} after "
        f"calibration (skip_bias {skip_bias:+.3f}) -> {args.out}"
    )
    return 0
