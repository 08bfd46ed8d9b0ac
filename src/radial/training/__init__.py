"""The shared training harness: one DeepSpeed ZeRO loop for the fine-tuning and routing stages.

Routers, distillation, SoFT and DLO train here. The embedded base model's pre-training does not:
it is a short plain-PyTorch loop of its own (radial.stages.base_model.pretrain), see that module.

Split by concern: `config` (TrainConfig and the shared flags), `distributed` (ranks, devices, rows),
`deepspeed_setup` (the ZeRO JSON files shipped in radial/resources/deepspeed), `loop` (train),
`checkpoints` (resume, run fingerprints, history), `plots`.

API (stages add to it, never break it):

    @dataclass
    class TrainConfig:                      # every field comes from config.yaml / the CLI
        steps: int                          # optimizer steps
        batch_size: int                     # examples per micro-batch (per GPU)
        grad_accum: int                     # micro-batches per optimizer step
        lr: float                           # peak AdamW learning rate (cosine decay to 0 after warm-up)
        warmup_steps: int                   # linear warm-up steps
        weight_decay: float                 # AdamW weight decay (matrices only; biases and norms get none)
        zero_stage: int                     # DeepSpeed ZeRO stage 0..3 (overrides the JSON's stage)
        checkpoint_every: int               # engine.save_checkpoint every N steps (0: only at the end)
        seed: int
        bf16: str                           # auto = bf16 where the hardware has it (CUDA with bf16), "true", "false"
        deepspeed_config: Path | None = None  # radial/resources/deepspeed/zero{1,2,3}.json; None = built in
        grad_clip: float                    # gradient-norm clipping (0 turns it off)
        eval_every: int                     # call eval_fn every N steps (0: only at the end)
        keep_checkpoints: int               # newest checkpoints kept on disk
        (limits and the defaults of the last four: `$defs.training` in the config schema)

    train(model, params, batch_for_step, loss_fn, cfg, checkpoint_dir, run=None, desc="train",
          eval_fn=None, fingerprint=None) -> TrainResult(history: list[dict], engine, resumed_from: int | None)
        model           the nn.Module to train; DeepSpeed wraps it (and under ZeRO-3 partitions it).
        params          the parameters to train; every other parameter of `model` is frozen
                        (requires_grad=False). None: whatever already requires grad. Also a list of
                        groups {"params": [...], "lr": peak_lr} when parts train at different rates.
        batch_for_step  micro_step -> batch dict; micro_step = step * grad_accum + k (k < grad_accum).
                        It must be a pure function of its argument: that is what makes resume exact.
                        Tensors in it are moved to the engine's device.
        loss_fn         (engine, batch) -> (loss, metrics); `engine` is called like the model, the
                        model itself is `engine.module`. Loss and metrics are averaged over the
                        micro-batches of a step and over the data-parallel ranks, and land in the history.
        eval_fn         (engine) -> metrics, run without gradients every cfg.eval_every steps and at
                        the end; merged into that step's history row.
        checkpoint_dir  engine.save_checkpoint every cfg.checkpoint_every steps and at the end; a
                        restart resumes from the newest one (engine.load_checkpoint) and goes on from
                        the step after it. history.jsonl there holds one row per step.
        fingerprint     what else identifies the run (stage settings, input hashes: file_fingerprint);
                        checkpoints written under other settings or inputs are discarded, not resumed.
        run             a wandb run (radial.tracking.stage_run): every history row is logged to it.
    gathered_state_dict(engine) -> dict[str, Tensor]   full weights on CPU, also under ZeRO-3
    unwrapped_copy(engine, template) -> nn.Module      a CPU float32 copy of `template` with those weights
    discard_checkpoints(checkpoint_dir)                 once the stage's output is written
    file_fingerprint(path) -> dict                      content hashes of an input file or folder
    run_fingerprint(args, *flags) -> dict               a fine-tuning run's flags, model and data files
    rank_batch_indices(n, batch_size, micro_step, seed) -> rows: seeded epoch shuffles, this rank's share
    plot_history(history, path, keys=None, title=None)  training curves PNG
    default_device() / rank() / world_size()            this process's device and place among the ranks
    add_train_arguments(parser, section) / train_config_from_args(args)   the shared CLI flags, with
                                                        the defaults of config section `section`
    start_stage(args) -> TrainConfig / checkpoint_dir_for(args)          what every training stage does first

Without a launcher (`python -m radial <stage>`) the harness sets RANK/WORLD_SIZE/MASTER_* itself
and runs as a single process (on CPU over gloo); under the `deepspeed` launcher or torchrun the
processes are already set up and each trains its data-parallel share (`batch_for_step` is then
called with the micro-step and should give every rank its own rows: see `rank_batch_indices`).

Every step reseeds torch from (seed, step), so random ops inside a step are the same whether or
not the run was interrupted; a resumed run retraces the uninterrupted one.
"""

from radial.training.checkpoints import (
    HISTORY_FILE,
    discard_checkpoints,
    file_fingerprint,
    gathered_state_dict,
    run_fingerprint,
    unwrapped_copy,
)
from radial.training.config import TrainConfig, add_train_arguments, checkpoint_dir_for, start_stage, train_config_from_args
from radial.training.deepspeed_setup import deepspeed_config, zero_config_file
from radial.training.distributed import default_device, ensure_distributed_env, rank, rank_batch_indices, use_bf16, world_size
from radial.training.loop import TrainResult, cosine_with_warmup, train
from radial.training.plots import plot_history

__all__ = [
    "HISTORY_FILE",
    "TrainConfig",
    "TrainResult",
    "add_train_arguments",
    "checkpoint_dir_for",
    "cosine_with_warmup",
    "deepspeed_config",
    "default_device",
    "discard_checkpoints",
    "ensure_distributed_env",
    "file_fingerprint",
    "gathered_state_dict",
    "plot_history",
    "rank",
    "rank_batch_indices",
    "run_fingerprint",
    "start_stage",
    "train",
    "train_config_from_args",
    "unwrapped_copy",
    "use_bf16",
    "world_size",
    "zero_config_file",
]
