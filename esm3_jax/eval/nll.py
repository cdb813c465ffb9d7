"""`esm3-jax evaluate`: per-track NLL, perplexity and accuracy of a checkpoint on a tokenized split.

Two measurements, both deterministic (a fixed data seed, no shuffling: the same proteins, crops
and masks on every call) and sharded like training (`setup_training`'s mesh and eval step):

1. At the training noise: every track masked by its own schedule, as the train step sees it.
   Per track: NLL over the masked labelled positions, perplexity exp(NLL), accuracy. This is the
   number a scaling ladder plots against compute.
2. Conditioning (the paper's "response to conditioning"): one target track fully masked at every
   residue position (and its loss taken there), and the other tracks either all absent (given
   nothing) or exactly one of them given intact. The same noise-free batches are transformed for
   every condition (`condition_batch`), so two rows differ only in what the model was given.

Beside each NLL is the unigram baseline: the entropy of the split's own token frequencies at the
evaluated positions, the NLL of a model that learned only how common each token is.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import TRACKS

# The tracks a condition can give, besides the targets' own: `coordinates` is the backbone
# (structure_coords, and per-residue pLDDT where a frame is shown), `structure` the VQ-VAE tokens.
GIVEN_TRACKS = ("sequence", "coordinates", "structure", "ss8", "sasa", "function")
NOTHING = "nothing"
# target -> the conditions it is measured under.
CONDITIONS: dict[str, tuple[str, ...]] = {
    "sequence": (NOTHING, "coordinates", "structure", "ss8", "sasa", "function"),
    "structure": (NOTHING, "sequence"),
    "ss8": (NOTHING, "sequence"),
    "sasa": (NOTHING, "sequence"),
}
# Vocabulary size per categorical track (for the unigram baseline's histogram).
_VOCAB = {"sequence": T.SEQUENCE_EMBED_ROWS, "structure": T.STRUCTURE_VOCAB_SIZE, "ss8": T.SS8_VOCAB_SIZE,
          "sasa": T.SASA_VOCAB_SIZE, "function": T.FUNCTION_VOCAB_SIZE}
_NOT_RESIDUE = (T.SEQUENCE_BOS, T.SEQUENCE_PAD, T.SEQUENCE_EOS, T.SEQUENCE_CHAINBREAK, T.SEQUENCE_MASK)
# Tracks whose pad id doubles as their mask id (and BOS/EOS).
_PAD_MASKED = {"ss8": "ss8_tokens", "sasa": "sasa_tokens", "function": "function_tokens",
               "residue_annotation": "residue_annotation_tokens"}


def residue_positions(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, L) bool: the positions holding a residue (not BOS, EOS, pad, chain break)."""
    return ~np.isin(batch["sequence_target"], _NOT_RESIDUE)


def labelled(batch: Mapping[str, np.ndarray], track: str) -> np.ndarray:
    """(B, L) bool: residue positions where `track` (a GIVEN_TRACKS name) has a real label."""
    res = residue_positions(batch)
    if track == "sequence":
        return res
    if track == "coordinates":
        return res & np.isfinite(batch["structure_coords"]).all(axis=(-2, -1))
    target = batch[f"{track}_target"]
    if track == "structure":
        return res & (target < T.STRUCTURE_CODEBOOK_SIZE)
    if track == "ss8":
        return res & (target > T.SS8_UNK)
    if track == "sasa":
        return res & (target >= T.SASA_FIRST_BIN)
    if track == "function":
        return res & (target != T.FUNCTION_PAD).any(axis=-1)
    raise ValueError(f"unknown track {track!r}")


def condition_batch(clean: Mapping[str, np.ndarray], target: str, given: str) -> dict[str, np.ndarray]:
    """A noise-free pipeline batch (every track intact) as the conditioning measurement feeds it.

    `target` is fully masked at its residue positions (its mask id; BOS/EOS/pad/chain breaks
    untouched) and its loss mask is exactly its labelled residue positions; `given` (one of
    GIVEN_TRACKS, or "nothing") stays as it is; every other track is masked at residue positions
    (sequence and structure tokens to their mask ids, the pad-masked tracks to 0), the coordinates
    are NaN and per-residue pLDDT 0 (as the pipeline shows no pLDDT without a frame). Pure numpy.
    """
    if given not in GIVEN_TRACKS and given != NOTHING:
        raise ValueError(f"unknown conditioning track {given!r}")
    if given == target:
        raise ValueError(f"the target track {target!r} cannot also be given")
    out = {k: np.array(v, copy=True) for k, v in clean.items()}
    res = residue_positions(clean)
    if given != "sequence":
        out["sequence_tokens"] = np.where(res, T.SEQUENCE_MASK, clean["sequence_tokens"]).astype(np.int32)
    if given != "structure":
        out["structure_tokens"] = np.where(res, T.STRUCTURE_MASK, clean["structure_tokens"]).astype(np.int32)
    for track, key in _PAD_MASKED.items():
        if given != track:
            keep = res.reshape(res.shape + (1,) * (clean[key].ndim - 2))
            out[key] = np.where(keep, 0, clean[key]).astype(np.int32)
    if given != "coordinates":
        out["structure_coords"] = np.full_like(clean["structure_coords"], np.nan)
        out["per_res_plddt"] = np.zeros_like(clean["per_res_plddt"])
    for track in TRACKS:
        out[f"{track}_loss_mask"] = np.zeros_like(clean[f"{track}_loss_mask"])
    out[f"{target}_loss_mask"] = labelled(clean, target)
    return out


def _unigram_entropy(hist: np.ndarray) -> float | None:
    n = hist.sum()
    if not n:
        return None
    p = hist[hist > 0] / n
    return float(-(p * np.log(p)).sum())


def _target_tokens(batch: Mapping[str, np.ndarray], track: str) -> np.ndarray:
    """The target ids at `track`'s loss positions (function: every non-pad slot there)."""
    mask, target = batch[f"{track}_loss_mask"], batch[f"{track}_target"]
    if track == "function":
        return target[mask[..., None] & (target != T.FUNCTION_PAD)]
    return target[mask]


@dataclasses.dataclass
class _Acc:
    """Running sums of one row: loss, correct, count, and the targets' histogram."""

    track: str
    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    hist: np.ndarray | None = None

    def add(self, sums, counts, batch) -> None:
        self.loss += float(sums[self.track][0])
        self.correct += float(sums[self.track][1])
        self.count += float(counts[self.track])
        if self.track in _VOCAB:
            ids = _target_tokens(batch, self.track)
            h = np.bincount(ids.ravel(), minlength=_VOCAB[self.track])
            self.hist = h if self.hist is None else self.hist + h

    def row(self, **extra) -> dict[str, Any]:
        out = {"target": self.track, **extra, "positions": int(self.count)}
        if not self.count:
            return {**out, "nll": None, "perplexity": None, "accuracy": None, "unigram_nll": None, "note": "no labels"}
        nll = self.loss / self.count
        unigram = _unigram_entropy(self.hist) if self.hist is not None else None
        return {**out, "nll": nll, "perplexity": math.exp(min(nll, 700.0)), "accuracy": self.correct / self.count,
                "unigram_nll": unigram}


def _n_batches(it: Iterator, n: int | None) -> Iterator[dict[str, np.ndarray]]:
    for i, batch in enumerate(it):
        if n is not None and i >= n:
            return
        yield batch


def evaluate(cfg, params, run, n_batches: int | None, progress: bool = True, *, conditioning: bool = True,
             step_cache: dict | None = None) -> dict[str, Any]:
    """Both measurements over the first `n_batches` batches (None: one pass) of `cfg.data.datasets`.

    `run` is `setup_training(cfg, ...)`, `params` on its mesh in its shardings. conditioning=False
    measures only at the training noise (the scaling ladder's number). `step_cache`: a dict kept by
    a caller that evaluates one model many times, so the eval step is compiled once."""
    import jax
    from tqdm import tqdm

    from esm3_jax.data import pipeline
    from esm3_jax.train import sharding as shd

    rows_global = cfg.data.batch_size
    data = dataclasses.replace(cfg.data, shuffle=False)
    noise = data.noise
    clean_noise = dataclasses.replace(noise, **{f"{t}_schedule": "none" for t in
                                                ("sequence", "structure", "coordinates", "ss8", "sasa", "function", "residue_annotation")},
                                      **{f"{t}_dropout": 0.0 for t in
                                         ("sequence", "structure", "coordinates", "ss8", "sasa", "function", "residue_annotation")})
    clean_data = dataclasses.replace(data, noise=clean_noise)

    def batches(dcfg):
        return _n_batches(pipeline.make_iterator(dcfg, num_epochs=1, drop_remainder=True), n_batches)

    cache = {} if step_cache is None else step_cache

    def run_step(local):
        if "step" not in cache:
            cache["shardings"] = run.batch_shardings(local)
            cache["step"] = run.eval_step(cache["shardings"])
        shardings = cache["shardings"]
        sums, counts = jax.device_get(cache["step"](params, shd.global_batch(local, shardings, rows_global)))
        return sums, counts

    noise_rows = {t: _Acc(t) for t in TRACKS}
    cond_rows = {(t, g): _Acc(t) for t, gs in CONDITIONS.items() for g in gs} if conditioning else {}
    given_labels = {g: 0 for g in GIVEN_TRACKS}
    total = None if n_batches is None else n_batches
    n_seen = 0
    bar = tqdm(total=total, desc="evaluate", unit="batch", disable=not progress, file=sys.stderr)
    # Without conditioning rows the noise-free batches are not needed: not decoded at all.
    clean_batches = batches(clean_data) if conditioning else itertools.repeat(None)
    for noisy, clean in zip(batches(data), clean_batches):
        sums, counts = run_step(noisy)
        for acc in noise_rows.values():
            acc.add(sums, counts, noisy)
        if not conditioning:
            n_seen += 1
            bar.update(1)
            continue
        for g in GIVEN_TRACKS:
            given_labels[g] += int(labelled(clean, g).sum())
        done = {}
        for (t, g), acc in cond_rows.items():
            if not labelled(clean, t).any():
                continue  # no position to score: the row's sums would gain exact zeros
            if g != NOTHING and not labelled(clean, g).any():
                # The given track is absent from every protein here: the batch is the very
                # batch "given nothing" was scored on, so its result is reused, not recomputed.
                acc.add(*done[t])
                continue
            b = condition_batch(clean, t, g)
            sums, counts = run_step(b)
            acc.add(sums, counts, b)
            if g == NOTHING:
                done[t] = (sums, counts, b)
        n_seen += 1
        bar.update(1)
    bar.close()
    if not n_seen:
        raise ValueError(f"{[d.path for d in cfg.data.datasets]}: not one full batch of {rows_global} rows "
                         "(lower data.batch_size)")
    cond_table = []
    for (t, g), acc in cond_rows.items():
        row = acc.row(given=g)
        if g != NOTHING and not given_labels[g] and row.get("note") is None:
            row = {**{k: (None if k in ("nll", "perplexity", "accuracy") else v) for k, v in row.items()},
                   "note": f"no labels ({g})"}
        cond_table.append(row)
    return {"batches": n_seen, "rows_per_batch": rows_global,
            "training_noise": [acc.row() for acc in noise_rows.values()], "conditioning": cond_table}


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def format_tables(result: Mapping[str, Any]) -> str:
    """The two tables as text: training noise per track, then target x condition."""
    head = f"{'NLL':>8} {'ppl':>9} {'acc':>7} {'positions':>10} {'unigram':>8}"

    def line(label, r):
        if r.get("note"):
            return f"{label} {r['note']:>44}"
        return (f"{label} {_fmt(r['nll']):>8} {_fmt(r['perplexity'], '.2f'):>9} {_fmt(r['accuracy']):>7} "
                f"{r['positions']:>10d} {_fmt(r['unigram_nll']):>8}")

    out = [f"at the training noise ({result['batches']} batches of {result['rows_per_batch']} rows)",
           f"{'track':<28} {head}"]
    out += [line(f"{r['target']:<28}", r) for r in result["training_noise"]]
    out += ["", "conditioning (target fully masked; one other track given, or nothing)",
            f"{'target <- given':<28} {head}"]
    out += [line(f"{r['target'] + ' <- ' + r['given']:<28}", r) for r in result["conditioning"]]
    out += ["", "NLL in nats per masked position; ppl = exp(NLL); unigram = entropy of the split's own "
            "token frequencies there"]
    return "\n".join(out)


# --- loading ---------------------------------------------------------------------------------------

DEFAULT_CONFIG = "tiny"  # configs/tiny.yaml


def _saved_run_config(where: dict) -> dict:
    import orbax.checkpoint as ocp

    from esm3_jax.compat import params_io

    with params_io._quiet_reads():
        mngr = ocp.CheckpointManager(where["run_dir"], options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            return mngr.restore(where["step"], args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        finally:
            mngr.close()


def load(checkpoint: str, data_dir: str, config: str | None, overrides: list[str], seed: int, devices=None):
    """(cfg, run, params) for evaluating `checkpoint` on `data_dir`; ValueError / FileNotFoundError
    naming the path for bad input."""
    import jax

    from esm3_jax.compat import params_io
    from esm3_jax.config import ConfigError, apply_overrides, from_dict, to_dict, validated
    from esm3_jax.data.preprocess import MANIFEST
    from esm3_jax.train import finetune
    from esm3_jax.train.config import Config, load_config, resolve_config_path
    from esm3_jax.train.setup import setup_training

    ck = Path(checkpoint)
    if not ck.exists():
        raise FileNotFoundError(f"--checkpoint {ck}: no such file or folder")
    split = Path(data_dir)
    if not (split / MANIFEST).is_file():
        raise FileNotFoundError(f"--data {split}: no {MANIFEST} (not a folder written by `esm3-jax preprocess`)")
    try:
        kind, saved_model, where = params_io.params_source(ck)
    except (params_io.CheckpointError, ValueError) as e:
        raise ValueError(f"--checkpoint {ck}: {e}") from e
    if kind != params_io.ESM3_KIND:
        raise ValueError(f"--checkpoint {ck}: holds a {kind} model, not an ESM3 one")

    if config is not None:
        cfg = load_config(resolve_config_path(config), overrides)
    elif "run_dir" in where:
        raw = apply_overrides(_saved_run_config(where), list(overrides))
        cfg = validated(from_dict(Config, raw, f"{ck} (saved config)"), f"{ck} (saved config)")
    else:
        cfg = load_config(resolve_config_path(DEFAULT_CONFIG), overrides)
    try:
        raw = to_dict(cfg)
        raw["model"] = {**saved_model, **{k: raw["model"][k] for k in finetune.EXECUTION_ONLY}}
        raw["data"]["datasets"] = [{"path": str(split)}]
        raw["data"]["seed"] = seed
        raw["train"]["init_from"] = ""
        raw["train"]["trainable"] = []
        raw["train"]["lora_rank"] = 0  # a LoRA run's adapters are merged into the kernels on load
        cfg = validated(from_dict(Config, raw, f"{ck} + {config or DEFAULT_CONFIG}"), str(ck))
    except ConfigError as e:
        raise ValueError(f"--checkpoint {ck}: its model config does not fit: {e}") from e
    try:
        run = setup_training(cfg, devices if devices is not None else jax.devices())
    except ValueError as e:
        raise ValueError(f"--checkpoint {ck}: its model does not fit the config's mesh or batch: {e}") from e
    from esm3_jax.train import state as state_lib

    target = state_lib.abstract_with_shardings(run.abstract_state.params, run.state_shardings.params)
    try:
        params = finetune.load_initial_params(str(ck), cfg.model, target)
    except ConfigError as e:
        raise ValueError(f"--checkpoint {ck}: {e}") from e
    return cfg, run, params


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training run (its output_dir or checkpoints/) or a `convert` params checkpoint")
    parser.add_argument("--data", required=True, help="a split folder written by `esm3-jax preprocess`")
    parser.add_argument("--config", default=None,
                        help=f"config for the data, batch and mesh settings (default: the run's saved config, "
                             f"or configs/{DEFAULT_CONFIG}.yaml for a params checkpoint); the model comes from the checkpoint")
    parser.add_argument("--batches", type=int, default=None, help="evaluate the first N batches (default: one pass)")
    parser.add_argument("--seed", type=int, default=0, help="data seed: fixes crops and masks (default 0)")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="also write the tables as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=16")


def cli_main(args: argparse.Namespace) -> int:
    if args.batches is not None and args.batches <= 0:
        raise ValueError(f"--batches must be positive, got {args.batches}")
    cfg, run, params = load(args.checkpoint, args.data, args.config, args.overrides, args.seed)
    result = evaluate(cfg, params, run, args.batches, progress=not args.no_progress)
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "seed": args.seed, **result}
    print(format_tables(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"json -> {args.json}")
    return 0
