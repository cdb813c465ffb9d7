"""Iterative unmasking of one track at a time (`esm3-jax generate`), as ESM3's generation does.

What: given a batch of proteins in the `forward` verb's format (batch-first, right-padded with each
track's pad id, NaN coordinates where absent) in which some positions of one track hold that
track's mask id, fill those positions in `num_steps` forward passes; every other track stays as
given (ESM3_SPEC 8). The reference is `esm.utils.generation.iterative_sampling_tokens` with
`esm.utils.sampling`; with deterministic settings (entropy strategy, temperature 0, no annealing)
the tokens match it exactly (tests/test_generate.py).

Why this shape: one jitted step per (rows, length bucket) does the forward pass, the sampling and
the choice of positions on the device; the host only runs the loop and the per-step schedule
numbers (which the reference computes in float32 on the host, so they are reproduced there).
Rows are padded to a multiple of `length_bucket`, so proteins of other lengths reuse the compiled
step, and padding carries `sequence_id` 0 while real positions carry >= 1, so attention never mixes
a row's padding into its residues: a protein's result does not depend on its batch mates (the
reference's `batch_generate` passes no sequence_id and does not have this property).

Per step t of a row with `total` masked positions and n = min(num_steps, total) steps:
  T_t   = max(T0 - t / max(1, n - 1), 0.001) ** 2 with annealing, else T0
  every open position is sampled: top-p (untempered), the track's special ids -> -inf,
        argmax if T_t == 0 else a draw from softmax(logits / T_t)
  k     = still_masked - int(schedule((t + 1) / n) * total + 0.1)    (float32; the last step: all)
  the k masked positions with the lowest entropy (or k random ones) take their sampled tokens.
Function tokens follow the reference's `<none>` rule instead of a draw: if the mean over the 8
sub-tokens of p(<none>) exceeds 0.05 all 8 are `<none>`, else each sub-token is its argmax.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import MODEL_INPUTS
from esm3_jax.inference.forward import InputError, load_esm3, read_npz, validate_inputs
from esm3_jax.model.config import ModelConfig
from esm3_jax.model.esm3 import ESM3
from esm3_jax.runtime import cpu_matmul


@dataclasses.dataclass(frozen=True)
class TrackSpec:
    """How one track is generated: its input array, its logits, its mask id, the ids it may take."""

    key: str  # the input array
    logits: str  # the model output
    mask: int  # the id a position to generate holds
    vocab: int  # real ids are 0..vocab-1 (the sequence head has 64 rows for 33 tokens)
    # Ids never sampled. The reference samples from all_token_ids - special_token_ids, so this is
    # the track's NEVER_SAMPLED ids plus its other specials (unk, motif, chain break).
    never: tuple[int, ...]


TRACKS: dict[str, TrackSpec] = {
    "sequence": TrackSpec("sequence_tokens", "sequence_logits", T.SEQUENCE_MASK, len(T.SEQUENCE_VOCAB),
                          T.SEQUENCE_NEVER_SAMPLED + (T.SEQUENCE_UNK, T.SEQUENCE_CHAINBREAK)),
    "structure": TrackSpec("structure_tokens", "structure_logits", T.STRUCTURE_MASK, T.STRUCTURE_VOCAB_SIZE,
                           T.STRUCTURE_NEVER_SAMPLED + (T.STRUCTURE_CHAINBREAK,)),
    "ss8": TrackSpec("ss8_tokens", "secondary_structure_logits", T.SS8_PAD, T.SS8_VOCAB_SIZE,
                     T.SS8_NEVER_SAMPLED + (T.SS8_MOTIF, T.SS8_UNK)),
    "sasa": TrackSpec("sasa_tokens", "sasa_logits", T.SASA_PAD, T.SASA_VOCAB_SIZE,
                      T.SASA_NEVER_SAMPLED + (T.SASA_MOTIF, T.SASA_UNK)),
    # The reference excludes no id from the function argmax; we exclude pad (= mask: a sampled 0
    # would read as "still masked"), motif and unk. <none> is handled by the p_none rule.
    "function": TrackSpec("function_tokens", "function_logits", T.FUNCTION_PAD, T.FUNCTION_VOCAB_SIZE,
                          T.FUNCTION_NEVER_SAMPLED + (T.FUNCTION_MOTIF, T.FUNCTION_UNK)),
}
SCHEDULES = ("cosine", "linear")
STRATEGIES = ("random", "entropy")
P_NONE_THRESHOLD = 0.05  # the reference's sample_function_logits default


class GenerateError(InputError):
    """A generation request that cannot run; the message names the source and the problem."""


# --- host-side schedule (float32, as the reference computes it) -----------------------------------


def still_masked_after(step: int, num_steps: int, total: int, schedule: str) -> int:
    """How many of `total` positions stay masked after step `step` (0-based) of `num_steps`."""
    x = np.float32((step + 1) / num_steps)
    if schedule == "cosine":
        frac = np.cos(x * np.float32(math.pi) * np.float32(0.5), dtype=np.float32)
    elif schedule == "linear":
        frac = np.float32(1.0) - x
    else:
        raise ValueError(f"unknown schedule '{schedule}'; choose from {SCHEDULES}")
    # The +0.1 guards against float32 landing just under an integer before truncation.
    return int(np.float32(frac * np.float32(total)) + np.float32(0.1))


def annealed_temperature(step: int, num_steps: int, temperature: float) -> float:
    return max(temperature - step / max(1, num_steps - 1), 0.001) ** 2


# --- device side -----------------------------------------------------------------------------------


def _top_p(logits_NxV: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """Keep the smallest prefix of the descending-sorted vocabulary whose (untempered) mass is
    <= top_p, always the first; the rest get float32 min, as the reference's top_p_logits does."""
    order = jnp.argsort(-logits_NxV, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits_NxV, order, axis=-1), axis=-1)
    keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) <= top_p).at[..., 0].set(True)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits_NxV, jnp.finfo(logits_NxV.dtype).min)


def _entropy(logits_NxV: jnp.ndarray) -> jnp.ndarray:
    logp = jax.nn.log_softmax(logits_NxV, axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _sample_plain(logits_LxV, valid_V, temperature, keys_L):
    """(tokens_L, entropy_L) of one row of an integer track."""
    logits_LxV = jnp.where(valid_V, logits_LxV, -jnp.inf)
    # The entropy that orders positions is of these masked, untempered logits (the reference's
    # sample_logits overwrites its logits in place before the entropy is taken).
    entropy_L = _entropy(logits_LxV)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    drawn_L = jax.vmap(jax.random.categorical)(keys_L, logits_LxV / safe_t)
    return jnp.where(temperature > 0, drawn_L, jnp.argmax(logits_LxV, axis=-1)), entropy_L


def _sample_function(logits_LxDxV, valid_V, temperature):
    """(tokens_LxD, entropy_L) of one row of the function track: the <none> rule, then argmax."""
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    tempered = jax.nn.log_softmax(logits_LxDxV / safe_t, axis=-1)
    # T == 0: p(<none>) is the limit of softmax(logits / T), a one-hot on the argmax (the
    # reference divides by zero there and gets NaN).
    one_hot = jax.nn.one_hot(jnp.argmax(logits_LxDxV, -1), logits_LxDxV.shape[-1])
    p_none_LxD = jnp.where(temperature > 0, jnp.exp(tempered), one_hot)[..., T.FUNCTION_NONE]
    is_none_L = jnp.mean(p_none_LxD, axis=-1) > P_NONE_THRESHOLD
    vocab = jnp.arange(logits_LxDxV.shape[-1])
    allowed = valid_V & ((vocab != T.FUNCTION_NONE) | is_none_L[:, None, None])
    # Argmax of the logits = argmax of the tempered log-probabilities, for any T > 0.
    tokens_LxD = jnp.argmax(jnp.where(allowed, logits_LxDxV, -jnp.inf), axis=-1)
    tokens_LxD = jnp.where(is_none_L[:, None], T.FUNCTION_NONE, tokens_LxD)
    # The joint entropy of the 8 sub-tokens (sum), of the distribution they were chosen from
    # (untempered at T == 0, where the tempered one is degenerate).
    logp = jnp.where(temperature > 0, tempered, jax.nn.log_softmax(logits_LxDxV, axis=-1))
    return tokens_LxD, jnp.sum(_entropy(jnp.where(allowed, logp, -jnp.inf)), axis=-1)


def _is_masked(tokens, spec: TrackSpec):
    m = tokens == spec.mask
    return jnp.all(m, axis=-1) if m.ndim == 3 else m


@functools.lru_cache(maxsize=32)
def make_step(cfg: ModelConfig, track: str, strategy: str, top_p: float, never_sample: tuple[int, ...] = ()):
    """A jitted step `(params, inputs, tokens, open_BxL, active_B, keep_masked_B, temperature_B,
    row_ids_B, key) -> tokens`: one forward pass and one round of unmasking of `track` in every active row.

    `open_BxL`: positions that may ever be generated (inside the row, not BOS/EOS/pad/chain break);
    `keep_masked_B`: how many masked positions each row keeps after this step;
    `never_sample`: ids excluded on top of the track's own (e.g. the non-standard amino acids).
    """
    spec = TRACKS[track]
    model = ESM3(cfg)

    def step(params, inputs, tokens, open_BxL, active_B, keep_masked_B, temperature_B, row_ids_B, key):
        out = model.apply({"params": params}, **{**inputs, spec.key: tokens})
        logits = out[spec.logits]
        vocab = jnp.arange(logits.shape[-1])
        valid_V = (vocab < spec.vocab) & ~jnp.isin(vocab, jnp.asarray(spec.never + tuple(never_sample)))
        if top_p < 1.0:
            logits = _top_p(logits, top_p)
        masked_BxL = _is_masked(tokens, spec) & open_BxL
        still_B = jnp.sum(masked_BxL, axis=-1)
        k_B = jnp.where(active_B, jnp.maximum(still_B - keep_masked_B, 0), 0)
        # One key per (row, position), from the row's index in the whole input and the position:
        # a row's draws depend on neither the batch size, the chunking nor the length bucket.
        keys_BxL = jax.vmap(lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, i), j))(
            jnp.arange(tokens.shape[1])))(row_ids_B)

        def per_row(logits_row, masked_L, k, temp, keys_L):
            sample_keys, order_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys_L), 1, 0)
            if track == "function":
                sampled, entropy_L = _sample_function(logits_row, valid_V, temp)
            else:
                sampled, entropy_L = _sample_plain(logits_row, valid_V, temp, sample_keys)
            if strategy == "entropy":
                score_L = entropy_L
            else:
                score_L = jax.vmap(jax.random.uniform)(order_keys)
            score_L = jnp.where(masked_L, score_L, jnp.inf)
            rank_L = jnp.argsort(jnp.argsort(score_L, stable=True), stable=True)
            return sampled.astype(jnp.int32), masked_L & (rank_L < k)

        sampled, chosen_BxL = jax.vmap(per_row)(logits, masked_BxL, k_B, temperature_B, keys_BxL)
        chosen = chosen_BxL[..., None] if tokens.ndim == 3 else chosen_BxL
        return jnp.where(chosen, sampled, tokens)

    return jax.jit(step, compiler_options=cpu_matmul.compiler_options(jax.default_backend(), cpu_matmul.DEFAULT))


# --- host side ----------------------------------------------------------------------------------


def row_lengths(inputs: dict[str, np.ndarray], source: str = "inputs") -> np.ndarray:
    """Each row's length (BOS .. EOS): up to the last position that is not padding, read from the
    sequence track (or the structure track without one)."""
    for key, pad in (("sequence_tokens", T.SEQUENCE_PAD), ("structure_tokens", T.STRUCTURE_PAD)):
        if key in inputs:
            real_BxL = inputs[key] != pad
            L = real_BxL.shape[1]
            return np.where(real_BxL.any(1), L - np.argmax(real_BxL[:, ::-1], axis=1), 0)
    raise GenerateError(f"{source}: generate needs 'sequence_tokens' (or 'structure_tokens') to tell where each row ends")


def _model_inputs(inputs: dict[str, np.ndarray], lengths_B: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays the model sees: as given, plus what the reference's ESM3.logits adds (pLDDT 1
    where a residue has coordinates) and a sequence_id that keeps padding out of attention."""
    x = dict(inputs)
    B, L = next(iter(inputs.values())).shape[:2]
    inside_BxL = np.arange(L)[None, :] < lengths_B[:, None]
    if "per_res_plddt" not in x and "structure_coords" in x:
        x["per_res_plddt"] = np.isfinite(x["structure_coords"]).all(-1).any(-1).astype(np.float32)
    sid = x.get("sequence_id", np.zeros((B, L), np.int32))
    # Shifted by one so that a given 0 (one protein, the forward's default) is still a real id.
    x["sequence_id"] = np.where(inside_BxL, sid - sid.min() + 1, 0).astype(np.int32)
    return x


def _pad_rows(x: dict[str, np.ndarray], rows: int, length: int) -> dict[str, np.ndarray]:
    """Right-pad every array to (rows, length) with its pad value (extra rows are all padding)."""
    out = {}
    for k, a in x.items():
        widths = [(0, rows - a.shape[0]), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        out[k] = np.pad(a, widths, constant_values=MODEL_INPUTS[k].pad)
    return out


def generate(
    cfg: ModelConfig,
    params: Any,
    inputs: dict[str, np.ndarray],
    track: str,
    num_steps: int,
    *,
    schedule: str = "cosine",
    strategy: str = "random",
    temperature: float = 1.0,
    temperature_annealing: bool = True,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    length_bucket: int = 64,
    never_sample: Sequence[int] = (),
    source: str = "inputs",
) -> dict[str, np.ndarray]:
    """Fill the masked positions of `track` in every row; return `inputs` with that array filled.

    `inputs` are the `forward` verb's arrays (validated here). Positions to generate hold the
    track's mask id (sequence 32, structure 4096 or -1, SS8/SASA/function 0 = their pad); BOS,
    EOS, chain breaks and padding are never touched. Rows run `batch_size` at a time (default: all)
    padded to a multiple of `length_bucket`; a row's result depends on the seed and its row index
    (random draws are keyed by seed, step, row and position), not on the other rows.
    `never_sample`: ids of the track never sampled on top of its special ids (inverse folding
    passes the non-standard amino acids X, B, U, Z, O, '.', '-' here).
    """
    if track not in TRACKS:
        raise GenerateError(f"{source}: unknown track '{track}'; choose from {list(TRACKS)}")
    if schedule not in SCHEDULES:
        raise GenerateError(f"{source}: unknown schedule '{schedule}'; choose from {SCHEDULES}")
    if strategy not in STRATEGIES:
        raise GenerateError(f"{source}: unknown strategy '{strategy}'; choose from {STRATEGIES}")
    if num_steps < 1:
        raise GenerateError(f"{source}: num_steps must be >= 1, got {num_steps}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerateError(f"{source}: need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    spec = TRACKS[track]
    inputs = validate_inputs(inputs, source)
    if spec.key not in inputs:
        raise GenerateError(f"{source}: no '{spec.key}' to generate into (put the mask id {spec.mask} where tokens are wanted)")
    lengths_B = row_lengths(inputs, source)
    tokens = inputs[spec.key]
    if track == "structure":
        tokens = np.where(tokens == -1, T.STRUCTURE_MASK, tokens).astype(np.int32)
    B, L = tokens.shape[:2]

    pos_L = np.arange(L)
    open_BxL = (pos_L[None] >= 1) & (pos_L[None] < lengths_B[:, None] - 1)
    if "sequence_tokens" in inputs:
        open_BxL &= inputs["sequence_tokens"] != T.SEQUENCE_CHAINBREAK
    masked = tokens == spec.mask
    total_B = ((masked.all(-1) if masked.ndim == 3 else masked) & open_BxL).sum(1)
    if np.any(total_B == 0):
        row = int(np.flatnonzero(total_B == 0)[0])
        raise GenerateError(
            f"{source}: row {row} has no masked '{track}' position to generate "
            f"('{spec.key}' must hold {spec.mask} at the positions to fill, BOS/EOS excluded)"
        )
    steps_B = np.minimum(num_steps, total_B)  # the reference caps num_steps at the masked count

    model_inputs = _model_inputs(inputs, lengths_B)
    model_inputs.pop(spec.key)
    never = tuple(sorted({int(i) for i in never_sample}))
    if any(not 0 <= i < spec.vocab for i in never):
        raise GenerateError(f"{source}: never_sample ids {never} outside the {track} vocabulary [0, {spec.vocab})")
    step_fn = make_step(cfg, track, strategy, float(top_p), never)
    params = jax.device_put(params)
    key = jax.random.PRNGKey(seed)
    chunk = min(batch_size or B, B)
    out = tokens.copy()
    for start in range(0, B, chunk):
        rows = slice(start, start + chunk)
        nb = len(range(B)[rows])
        Lb = -(-int(lengths_B[rows].max()) // length_bucket) * length_bucket
        # Every chunk has `chunk` rows: the last one is filled up with padding rows, no recompile.
        x = _pad_rows({k: v[rows, : min(L, Lb)] for k, v in model_inputs.items()}, chunk, Lb)
        tok = _pad_rows({spec.key: tokens[rows, : min(L, Lb)]}, chunk, Lb)[spec.key]
        opn = np.zeros((chunk, Lb), bool)
        opn[:nb, : min(L, Lb)] = open_BxL[rows, : min(L, Lb)]
        x_dev = jax.tree.map(jnp.asarray, x)
        tok_dev, opn_dev = jnp.asarray(tok), jnp.asarray(opn)
        n_b = np.zeros(chunk, int)
        n_b[:nb] = steps_B[rows]
        tot_b = np.zeros(chunk, int)
        tot_b[:nb] = total_B[rows]
        row_ids = jnp.arange(start, start + chunk)
        for t in range(int(n_b.max())):
            active = t < n_b
            keep = np.array([still_masked_after(t, n, tot, schedule) if a else 0 for a, n, tot in zip(active, n_b, tot_b)], np.int32)
            temps = np.array([annealed_temperature(t, n, temperature) if temperature_annealing and a else temperature
                              for a, n in zip(active, n_b)], np.float32)
            tok_dev = step_fn(params, x_dev, tok_dev, opn_dev, jnp.asarray(active), jnp.asarray(keep),
                              jnp.asarray(temps), row_ids, jax.random.fold_in(key, t))
        out[rows, : min(L, Lb)] = np.asarray(tok_dev)[:nb, : min(L, Lb)]
    result = dict(inputs)
    result[spec.key] = out.astype(np.int32)
    return result


def generate_chain(
    cfg: ModelConfig,
    params: Any,
    inputs: dict[str, np.ndarray],
    plan: Sequence[tuple[str, int]],
    *,
    seed: int = 0,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Chain of thought: generate the tracks of `plan` = [(track, num_steps), ...] in order, each
    conditioned on the ones before (e.g. [("ss8", 8), ("structure", 16), ("sequence", 16)])."""
    x = inputs
    for i, (track, num_steps) in enumerate(plan):
        x = generate(cfg, params, x, track, num_steps, seed=seed + i, **options)
    return x


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The options every generation request shares (the batch `--inputs` form and free design)."""
    p.add_argument("--strategy", default="random", help="which masked positions unmask first: random or entropy (lowest first)")
    p.add_argument("--schedule", default="cosine", help="how many unmask by each step: cosine or linear")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: argmax)")
    p.add_argument("--no-temperature-annealing", action="store_true", help="keep the temperature fixed (default: anneal as the reference does)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="rows per compiled step (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the checkpoint's)")


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="esm3-jax checkpoint directory (from `convert` or training)")
    p.add_argument("--inputs", required=True, help=".npz in the `forward` verb's format; the positions to generate hold the track's mask id")
    p.add_argument("--track", required=True, help=f"the track to generate: {', '.join(TRACKS)}")
    p.add_argument("--num-steps", type=int, required=True, help="forward passes (capped at each row's masked count)")
    add_sampling_arguments(p)
    p.add_argument("--out", required=True, help="output .npz: the input arrays with the track filled")


def cli_main(args: argparse.Namespace) -> int:
    path = Path(args.inputs)
    raw = read_npz(path)
    # Everything about the request is checked before the checkpoint is read.
    if args.track not in TRACKS:
        raise GenerateError(f"{path}: unknown track '{args.track}'; choose from {list(TRACKS)}")
    cfg, params = load_esm3(args.checkpoint, args.dtype)
    started = time.perf_counter()
    out = generate(cfg, params, raw, args.track, args.num_steps, schedule=args.schedule, strategy=args.strategy,
                   temperature=args.temperature, temperature_annealing=not args.no_temperature_annealing,
                   top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, source=str(path))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    key = TRACKS[args.track].key
    changed = int(np.sum(np.any((out[key] != raw[key]).reshape(out[key].shape[0], out[key].shape[1], -1), -1)))
    print(f"generate: {args.track} at {changed} positions of {out[key].shape[0]} row(s) in "
          f"{time.perf_counter() - started:.1f} s (compilation included) -> {args.out}")
    if args.track == "sequence":
        for i, row in enumerate(out[key]):
            print(f"  row {i}: {T.decode_sequence(row)}")
    return 0
