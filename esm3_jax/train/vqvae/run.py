"""`esm3-jax train-vqvae --config configs/vqvae_*.yaml`: the training run loop and the CLI verb
(the stages are in stages.py). A run writes to train.output_dir: checkpoints/ (resumable),
metrics.csv (the loss curve), encoder/ and decoder/ (params checkpoints for `tokenize-structure` /
`decode-structure`) and eval.json (validation backbone RMSD, LDDT-CA and codebook usage)."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from esm3_jax.config import to_dict
from esm3_jax.train.checkpoint import Checkpointer
from esm3_jax.train.vqvae.config import VQVAEConfig, load_vqvae_config
from esm3_jax.train.vqvae.data import SHARED_STRUCTURES_DIR, batches, load_split
from esm3_jax.train.vqvae.evaluate import eval_chains, evaluate, evaluate_run
from esm3_jax.train.vqvae.stages import Stage2, _has_structure, _stage1


_MAX_PRINTED_CHAINS = 16


def train(cfg: VQVAEConfig, progress: bool = True) -> dict[str, Any]:
    t = cfg.train
    data_dir = Path(t.data_dir) if t.data_dir else SHARED_STRUCTURES_DIR
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_chains = load_split(data_dir, "train", t.max_train_chains, cfg.decoder.all_atom, t.max_chain_length)
    # Loaded up front, so that a missing split fails before training, not after it.
    scored_chains = eval_chains(cfg, t.eval_split)

    trainer = _stage1(cfg) if t.stage == 1 else Stage2(cfg)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=2, async_save=False)
    first = _has_structure(next(batches(train_chains, t.batch_size, t.crop_length, t.seed)))
    resuming = bool(ckpt.all_steps())
    state = trainer.init(first, jax.random.PRNGKey(t.seed), resuming)
    restored = ckpt.restore_latest(state, None)
    start = 0
    if restored is not None:
        start, state = restored
        print(f"resumed from step {start}")
    elif resuming:  # no saved step reads back intact: a fresh start after all, fully initialised
        state = trainer.init(first, jax.random.PRNGKey(t.seed))

    metrics_path = out_dir / "metrics.csv"
    writer, fh = None, None
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, disable=not progress, desc="train-vqvae", unit="step")
    t0 = time.time()
    data = batches(train_chains, t.batch_size, t.crop_length, t.seed, start)
    for step in range(start, t.steps):
        if t.stage == 1 and step == t.vq_warmup_steps and step > 0:
            # End of the warm-up: fit the codebook to what the encoder now produces.
            fit_data = batches(train_chains, t.batch_size, t.crop_length, t.seed + 1)
            fit = [{k: jnp.asarray(v) for k, v in _has_structure(next(fit_data)).items()} for _ in range(4)]
            state = trainer.fit_codebook(state, fit, jax.random.PRNGKey(t.seed + step))
        batch = {k: jnp.asarray(v) for k, v in _has_structure(next(data)).items()}
        state, m = trainer.step_fns[step >= t.vq_warmup_steps](state, batch)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            row = {"step": done, "time_s": round(time.time() - t0, 1), **{k: float(v) for k, v in m.items()}}
            if writer is None:
                fh = metrics_path.open("a" if start else "w", newline="")
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if not start:
                    writer.writeheader()
            writer.writerow(row)
            fh.flush()
            bar.set_postfix(loss=f"{row['total']:.3f}")
        if done % t.checkpoint_every == 0 or done == t.steps:
            ckpt.save(done, state, None, to_dict(cfg))
        bar.update(1)
    bar.close()
    ckpt.close()
    if fh is not None:
        fh.close()
    enc_dir, dec_dir = trainer.export(state, out_dir)
    train_seconds = round(time.time() - t0, 1)
    result = evaluate(enc_dir, dec_dir, scored_chains, t.eval_max_length)
    result.update(split=t.eval_split, steps=t.steps, train_chains=len(train_chains), train_seconds=train_seconds)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/vqvae_small.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate the run's exported encoder/ and decoder/ on the valid split "
                        "(e.g. with train.eval_max_length=96 for crops of the training length)")
    p.add_argument("--split", default=None, choices=("valid", "train"),
                   help="--eval-only: the split to evaluate (default train.eval_split; train.max_valid_chains caps its size)")
    p.add_argument("--data", default=None,
                   help="structure folder to train on (sets train.data_dir): one with the shared index.jsonl, or any "
                        "folder of PDB/mmCIF files, whose chains all count as training chains")


def cli_main(args: argparse.Namespace) -> int:
    if args.split is not None and not args.eval_only:
        raise ValueError("--split chooses what --eval-only evaluates; training evaluates train.eval_split")
    overrides = list(args.overrides)
    if args.data is not None:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"{args.data}: --data must be a folder of structure files")
        overrides.append(f"train.data_dir={args.data}")
    cfg = load_vqvae_config(args.config, overrides)
    result = evaluate_run(cfg, args.split) if args.eval_only else train(cfg, progress=not args.no_progress)
    if len(result["per_chain"]) > _MAX_PRINTED_CHAINS:  # eval.json keeps them all
        result = {k: v for k, v in result.items() if k != "per_chain"}
    print(json.dumps(result, indent=2))
    return 0
