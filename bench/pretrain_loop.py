"""Should the embedded pre-training run through the DeepSpeed harness? Time one against the other.

    python bench/pretrain_loop.py [--steps 30] [--rounds 2] [--threads 2]

Both train the embedded default's model shape (config.yaml model.embedded) from the same
initialisation on the same synthetic batches: the stage's own plain-PyTorch loop
(radial.stages.base_model.pretrain's optimizer step: AdamW, clip, scheduler) and radial.training.train
(deepspeed.initialize, ZeRO stage 0, CPU). Rounds alternate the two. It prints the seconds per step of
each and the last line `harness_over_plain=<ratio> deepspeed_initialize_s=<first initialize>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from radial import training


def build_model(embedded: dict, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=embedded["hidden_size"], intermediate_size=embedded["intermediate_size"],
            num_hidden_layers=embedded["layers"], num_attention_heads=embedded["heads"],
            num_key_value_heads=embedded["kv_heads"], max_position_embeddings=512, tie_word_embeddings=True,
        )
    )


def batch(step: int, rows: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(3, vocab, (rows, 24), generator=generator)
    return {"input_ids": ids, "labels": ids}


def plain_loop(model, steps: int, rows: int, vocab: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    started = time.perf_counter()
    for step in range(steps):
        loss = model(**batch(step, rows, vocab)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def harness(model, steps: int, rows: int, vocab: int, checkpoint_dir: Path) -> tuple[float, float]:
    cfg = training.TrainConfig(steps=steps, batch_size=rows, grad_accum=1, lr=3e-3, warmup_steps=0, weight_decay=0.1,
                               zero_stage=0, checkpoint_every=0, seed=0, deepspeed_config=training.zero_config_file(0))
    started = time.perf_counter()
    result = training.train(model, None, lambda micro: batch(micro, rows, vocab),
                            lambda engine, b: (engine(**b).loss, {}), cfg, checkpoint_dir, desc="harness")
    total = time.perf_counter() - started
    per_step = statistics.median(row["seconds"] for row in result.history)
    return per_step, total - per_step * steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    embedded = config["model"]["embedded"]
    vocab, rows = embedded["vocab_size"], embedded["synthetic_batch_size"]
    plain, through_harness, overheads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            plain.append(plain_loop(build_model(embedded, vocab), args.steps, rows, vocab))
            per_step, overhead = harness(build_model(embedded, vocab), args.steps, rows, vocab, Path(tmp) / str(round_index))
            through_harness.append(per_step)
            overheads.append(overhead)
    print(f"{'round':>5} {'plain s/step':>13} {'harness s/step':>15} {'harness fixed s':>16}")
    for index, (a, b, c) in enumerate(zip(plain, through_harness, overheads)):
        print(f"{index:>5} {a:>13.4f} {b:>15.4f} {c:>16.1f}")
    ratio = statistics.median(through_harness) / statistics.median(plain)
    print(f"harness_over_plain={ratio:.3f} deepspeed_initialize_s={overheads[0]:.1f}")


if __name__ == "__main__":
    main()
