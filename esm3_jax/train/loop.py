"""`esm3-jax train`: the pretraining loop a user runs.

Everything that can be wrong with a config is checked before the first compile; then the run
builds the mesh, restores the latest intact checkpoint (or else starts from `train.init_from`'s
parameters, or a fresh sharded state),
compiles the train step once, and loops: step, metrics to the progress bar and TensorBoard,
validation every `eval_every` steps, a checkpoint every `checkpoint_every` steps and at the end.
SIGTERM (preemption) finishes the current step, saves, and exits 0; a non-finite loss skips the
update, and `max_nonfinite_in_a_row` of them stop the run with an error and no checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from typing import Callable, Iterator

import jax
import numpy as np

from esm3_jax.config import ConfigError, to_dict
from esm3_jax.model.flops import train_flops_per_token
from esm3_jax.runtime import allocator, distributed
from esm3_jax.runtime.hardware import matmul_peak_flops_once, peak_flops_per_device
from esm3_jax.train import finetune, optim
from esm3_jax.train import sharding as shd
from esm3_jax.train import state as state_lib
from esm3_jax.train.checkpoint import Checkpointer
from esm3_jax.train.config import Config, load_config
from esm3_jax.train.evaluate import eval_pass, format_eval
from esm3_jax.train.metrics import MetricWriter
from esm3_jax.train.setup import setup_training

log = logging.getLogger(__name__)

BatchIterator = Iterator[dict[str, np.ndarray]]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    step: int  # the last completed step
    reason: str  # "finished" | "preempted"
    metrics: dict[str, float]  # the last step's
    eval_metrics: dict[str, float]  # the last validation pass's (empty if none)
    checkpoint_dir: str
    tensorboard_dir: str


def check_run_config(cfg: Config, n_devices: int, process_count: int, *, need_datasets: bool = True) -> None:
    """Everything about mesh and batch that must hold, checked before anything is compiled."""
    mesh_shape = cfg.mesh.shape(n_devices)
    rows = cfg.data.batch_size
    if rows % process_count:
        raise ConfigError(f"data.batch_size={rows} does not divide over {process_count} processes")
    accum = cfg.train.grad_accum_steps
    if rows % accum:
        raise ConfigError(f"data.batch_size={rows} is not divisible by train.grad_accum_steps={accum}")
    axes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    shards = int(np.prod([axes[a] for a in cfg.mesh.rules.batch])) if cfg.mesh.rules.batch else 1
    if (rows // accum) % shards:
        raise ConfigError(
            f"microbatch of {rows // accum} rows (data.batch_size / train.grad_accum_steps) does not split "
            f"over the {shards} batch shards of mesh axes {list(cfg.mesh.rules.batch)}"
        )
    if need_datasets and not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: list at least one folder written by `esm3-jax preprocess`")


def _default_train_iterator(cfg: Config) -> BatchIterator:
    from esm3_jax.data import pipeline

    return pipeline.make_iterator(cfg.data)


def _default_eval_iterator(cfg: Config) -> BatchIterator:
    from esm3_jax.data import pipeline

    eval_data = dataclasses.replace(cfg.data, datasets=cfg.train.eval_datasets, shuffle=False)
    return pipeline.make_iterator(eval_data, num_epochs=None)


class _Preemption:
    """SIGTERM sets a flag; the loop saves and stops at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no preemption hook
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def anywhere(self) -> bool:
        """True if any process was asked to stop (all processes must save together)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _real_tokens(local_batch: dict[str, np.ndarray]) -> int:
    return int(np.count_nonzero(local_batch["sequence_id"]))


def train(
    cfg: Config,
    *,
    make_train_iter: Callable[[], BatchIterator] | None = None,
    make_eval_iter: Callable[[], BatchIterator] | None = None,
    devices: list | None = None,
    on_step: Callable[[int, state_lib.TrainState], None] | None = None,
) -> RunResult:
    """Run (or resume) training as `cfg` says. The iterator factories default to the Grain pipeline
    over data.datasets / train.eval_datasets; each yields this process's rows of every batch.

    `on_step(step, state)`, if given, runs after every step and before that step's checkpoint is
    saved, so work it records for a step (the scaling ladder's evaluations) is never behind the
    checkpoint a resumed run starts from."""
    tc = cfg.train
    devices = list(jax.devices() if devices is None else devices)
    check_run_config(cfg, len(devices), jax.process_count(), need_datasets=make_train_iter is None)
    if make_train_iter is None:
        make_train_iter = lambda: _default_train_iterator(cfg)
    if tc.eval_every and make_eval_iter is None:
        make_eval_iter = lambda: _default_eval_iterator(cfg)
    main_process = jax.process_index() == 0
    say = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
    with _Preemption() as preemption:
        return _train(cfg, make_train_iter, make_eval_iter, devices, preemption, say, main_process, on_step)


def _train(cfg, make_train_iter, make_eval_iter, devices, preemption, say, main_process, on_step=None) -> RunResult:
    tc = cfg.train
    run = setup_training(cfg, devices)
    trainable = "" if not tc.trainable_patterns else f" ({run.trainable_count:,} trainable, the rest frozen)"
    if tc.lora_rank:
        trainable += f"; LoRA rank {tc.lora_rank}, alpha {tc.lora_alpha:g} on {', '.join(tc.lora_targets)}"
    say(f"esm3-jax train: {run.param_count:,} parameters{trainable}; mesh {shd.mesh_summary(run.mesh)}; "
        f"batch {cfg.data.batch_size} x {cfg.data.max_length} tokens; {tc.steps} steps; "
        f"host allocator {allocator.active()}")
    say(f"  checkpoints -> {tc.checkpoint_dir}\n  tensorboard -> {tc.tensorboard_dir}")

    ckpt = Checkpointer(tc.checkpoint_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    resuming = tc.resume and bool(ckpt.all_steps())
    if tc.init_from and not resuming:
        # From the checkpoint's metadata: a model that does not fit fails before data and compiles.
        try:
            finetune.check_init_from(tc.init_from, cfg.model)
        except Exception:
            ckpt.close()
            raise
    train_iter = make_train_iter()
    cfg_dict = to_dict(cfg)
    restored = None
    if resuming:
        _check_same_model(ckpt, cfg_dict)
        restored = ckpt.restore_latest(run.restore_target(), train_iter)
    if restored is not None:
        start_step, state_dict = restored
        state = state_lib.TrainState.from_dict(state_dict)
        say(f"  resumed from step {start_step}")
        if start_step >= tc.steps:
            ckpt.close()
            say(f"done: the run already reached train.steps={tc.steps}; raise it to train further")
            return RunResult(step=start_step, reason="finished", metrics={}, eval_metrics={},
                             checkpoint_dir=tc.checkpoint_dir, tensorboard_dir=tc.tensorboard_dir)
    else:
        start_step = 0
        state = run.initial_state()
        if tc.init_from:
            say(f"  initialised from {tc.init_from} (fresh optimizer state, step 0)")

    rows = cfg.data.batch_size
    first_local = next(train_iter)
    batch_sh = run.batch_shardings(first_local)
    t0 = time.time()
    first_batch = shd.global_batch(first_local, batch_sh, rows)
    compiled = run.train_step(batch_sh).lower(state, first_batch).compile()
    eval_step = None
    if tc.eval_every:
        eval_step = run.eval_step(batch_sh).lower(state.params, first_batch).compile()
    say(f"  compiled in {time.time() - t0:.1f}s")
    distributed.barrier("esm3_jax_train_compiled")

    flops_per_step = train_flops_per_token(cfg.model, cfg.data.max_length) * rows * cfg.data.max_length
    peak = peak_flops_per_device(devices[0].device_kind, tc.peak_flops_per_device)
    if peak is None:
        # No datasheet number for this device (a CPU): measure its matmul rate (once per process),
        # so MFU is shown.
        peak = matmul_peak_flops_once(jax.numpy.dtype(cfg.model.dtype).name, n=1024, repeats=3)
        say(f"  measured matmul peak of {devices[0].device_kind}: {peak / 1e9:.0f} GFLOP/s per device (for MFU)")
    writer = MetricWriter(tc.tensorboard_dir if main_process else None,
                          wandb_project=tc.wandb_project if tc.wandb else None, config=cfg_dict)
    bar = _progress_bar(tc.steps, start_step, enabled=main_process and tc.progress_bar)
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    reason = "finished"
    step = start_step
    local = first_local
    profiling = False
    try:
        for step in range(start_step + 1, tc.steps + 1):
            if local is None:
                local = next(train_iter)
            if tc.profile_steps and step == tc.profile_steps[0]:
                jax.profiler.start_trace(tc.profile_dir)
                profiling = True
            t_step = time.time()
            state, device_metrics = compiled(state, shd.global_batch(local, batch_sh, rows))
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            dt = time.time() - t_step
            if profiling and step == tc.profile_steps[1]:
                jax.profiler.stop_trace()
                profiling = False
                say(f"  profile of steps {tc.profile_steps[0]}-{step} -> {tc.profile_dir}")
            tokens = _real_tokens(local) * jax.process_count()
            local = None
            metrics["tokens_per_s"] = tokens / dt
            metrics["step_time_s"] = dt
            if peak:
                metrics["mfu"] = flops_per_step / (dt * peak * len(devices))
            if metrics["skipped"]:
                log.warning("step %d: non-finite loss or gradient (%d in a row, %d in all); update skipped",
                            step, metrics["nonfinite_in_a_row"], metrics["nonfinite_total"])
                if metrics["nonfinite_in_a_row"] >= tc.max_nonfinite_in_a_row:
                    raise TrainingDiverged(
                        f"step {step}: {int(metrics['nonfinite_in_a_row'])} consecutive steps with a "
                        f"non-finite loss or gradient (train.max_nonfinite_in_a_row="
                        f"{tc.max_nonfinite_in_a_row}); stopped without saving. The last good "
                        f"checkpoint is in {tc.checkpoint_dir}"
                    )
            bar.update(1)
            bar.set_postfix_str(_postfix(step, metrics), refresh=False)
            if step % tc.log_every == 0 or step == tc.steps:
                writer.scalars(step, {k: v for k, v in metrics.items()}, prefix="train/")
                writer.scalars(step, {"learning_rate": float(optim.learning_rate_schedule(tc)(step - 1))},
                               prefix="train/")
            if eval_step is not None and step % tc.eval_every == 0:
                eval_metrics = eval_pass(eval_step, state.params, make_eval_iter, tc.eval_batches, batch_sh, rows)
                writer.scalars(step, eval_metrics, prefix="eval/")
                bar.write(f"step {step} validation NLL: " + format_eval(eval_metrics))
            if on_step is not None:
                on_step(step, state)
            saved = False
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                ckpt.save(step, state.as_dict(), train_iter, cfg_dict)
                saved = True
            if preemption.anywhere():
                if not saved:
                    ckpt.save(step, state.as_dict(), train_iter, cfg_dict)
                reason = "preempted"
                break
    finally:
        if profiling:
            jax.profiler.stop_trace()
        bar.close()
        writer.close()
        ckpt.close()  # waits for the last asynchronous save
    if reason == "preempted":
        say(f"SIGTERM: saved step {step} to {tc.checkpoint_dir}; run again to resume")
    else:
        say(f"done: step {step}; loss {metrics.get('loss', float('nan')):.4f}; "
            f"checkpoints in {tc.checkpoint_dir}; TensorBoard logs in {tc.tensorboard_dir}")
    return RunResult(step=step, reason=reason, metrics=metrics, eval_metrics=eval_metrics,
                     checkpoint_dir=tc.checkpoint_dir, tensorboard_dir=tc.tensorboard_dir)


def _check_same_model(ckpt: Checkpointer, cfg_dict: dict) -> None:
    saved = ckpt.saved_config()
    if saved is not None and saved.get("model") != cfg_dict["model"]:
        diff = {k: (saved["model"].get(k), v) for k, v in cfg_dict["model"].items() if saved["model"].get(k) != v}
        raise ConfigError(
            f"{ckpt.directory} holds checkpoints of a different model (saved vs now: {diff}); "
            "choose another train.output_dir, or train.resume=false to start over there"
        )
    # The adapters are part of the saved parameters: a run resumes under its own LoRA settings.
    lora = lambda train: ((train.get("lora_rank", 0), train.get("lora_alpha"), list(train.get("lora_targets", ())))
                          if train.get("lora_rank") else (0,))
    if saved is not None and lora(saved.get("train", {})) != lora(cfg_dict["train"]):
        raise ConfigError(
            f"{ckpt.directory} holds checkpoints of another LoRA setting (saved (rank, alpha, targets) "
            f"{lora(saved.get('train', {}))} vs now {lora(cfg_dict['train'])}); choose another "
            "train.output_dir, or train.resume=false to start over there")


def _postfix(step: int, m: dict[str, float]) -> str:
    parts = [f"step {step}", f"loss {m['loss']:.4f}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if m.get("nonfinite_total"):
        parts.append(f"skipped {int(m['nonfinite_total'])}")
    return ", ".join(parts)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, desc="train")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.steps=200 data.batch_size=16")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process: the coordinator's address")
    parser.add_argument("--num-processes", type=int, help="multi-process: how many processes in all")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's rank")


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # bad keys/values fail here, before any compile
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"esm3-jax train: error: {e}", file=sys.stderr)
        return 3
    return 0
