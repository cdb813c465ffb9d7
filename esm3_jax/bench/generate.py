"""`esm3-jax bench generate`: batch generation (iterative unmasking of one track) against the
reference's `ESM3.batch_generate` on the same config, weights, proteins and decoding settings.

What is compared: a batch of proteins of mixed lengths, every input track given (sequence or
structure tokens, SS8, SASA, function and residue-annotation tokens, backbone coordinates when
the sequence is generated), the generated track masked at every residue, filled in `num_steps`
forward passes. Both sides run the same settings (schedule, strategy, temperature, annealing);
proteins/s is the batch size over the best round's wall time, the rounds alternating between the
two so that a machine busy for a while slows both alike. The first call of each is reported apart
(ours compiles its step there). Forward passes are counted where they happen (calls of our jitted
step, calls of the reference's `ESM3.logits`), and the time spent in them is split out so that the
host-side loop's share shows.

Tokens: with the deterministic settings (entropy strategy, temperature 0, no annealing) a row of
the longest length must come out identical; shorter rows may not, because the reference's
`batch_generate` gives its forward no sequence_id, so its shorter rows attend to their padding
(ours keeps padding out of attention: a protein's tokens do not depend on its batch mates).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import random_inputs, stack_proteins
from esm3_jax.runtime.hardware import matmul_peak_flops
from esm3_jax.train.config import load_config, resolve_config_path

BENCH_TRACKS = ("sequence", "structure")
# (strategy, temperature, temperature_annealing)
SAMPLINGS = {
    "deterministic": ("entropy", 0.0, False),  # argmax, lowest entropy first: tokens comparable
    "default": ("random", 1.0, True),  # the reference GenerationConfig's defaults
}
DEFAULT_LENGTHS = tuple(int(round(x)) for x in np.linspace(64, 256, 8))  # 64, 91, ..., 256


def bench_proteins(lengths, track: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One protein per length (BOS .. EOS included): every track random but valid, as
    batch.random_inputs makes them, with `track` masked at every residue. Coordinates are
    given when the sequence is generated, left out when the structure is (they would give it away)."""
    out = []
    for i, n in enumerate(lengths):
        x = {k: v[0] for k, v in random_inputs(1, n, seed=seed + i).items()}
        p = {k: x[k] for k in ("sequence_tokens", "structure_tokens", "ss8_tokens", "sasa_tokens",
                               "function_tokens", "residue_annotation_tokens", "structure_coords")}
        p["structure_tokens"][0], p["structure_tokens"][-1] = T.STRUCTURE_BOS, T.STRUCTURE_EOS
        if track == "sequence":
            p["sequence_tokens"][1:-1] = T.SEQUENCE_MASK
        else:
            p["structure_tokens"][1:-1] = T.STRUCTURE_MASK
            del p["structure_coords"]
        out.append(p)
    return out


def _reference_tensors(proteins):
    import torch
    from esm.sdk.api import ESMProteinTensor

    names = dict(sequence_tokens="sequence", structure_tokens="structure", ss8_tokens="secondary_structure",
                 sasa_tokens="sasa", function_tokens="function", residue_annotation_tokens="residue_annotations",
                 structure_coords="coordinates")
    return [ESMProteinTensor(**{names[k]: torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v)
                                for k, v in p.items()}) for p in proteins]


@contextlib.contextmanager
def _counting_our_steps(record: dict, block: bool = False):
    """Count the calls of generate's jitted step (one forward pass each); with `block`, also the
    seconds spent in them (waiting for each result) and the last call's arguments."""
    from esm3_jax.inference import generate as G

    original = G.make_step

    def make_step(*a, **kw):
        step = original(*a, **kw)

        def counted(*args):
            record["passes"] = record.get("passes", 0) + 1
            if not block:
                return step(*args)
            t0 = time.perf_counter()
            out = jax.block_until_ready(step(*args))
            record["seconds"] = record.get("seconds", 0.0) + time.perf_counter() - t0
            record["args"] = args
            return out

        return counted

    G.make_step = make_step
    try:
        yield record
    finally:
        G.make_step = original


def bench_generate(config: str = "small", lengths=DEFAULT_LENGTHS, num_steps: int = 16, track: str = "sequence",
                   sampling: str = "deterministic", repeats: int = 2, seed: int = 0, reference=None,
                   device: str = "cpu", autocast_bf16: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """esm3-jax `generate` vs the reference `batch_generate`; returns the numbers it prints.

    reference: a (model, state dict) pair from `build_reference_esm3` at this config, to reuse one
    already built; device, autocast_bf16: where the reference runs, and whether in bf16 autocast
    (as it runs on a GPU; launch/gpu_check.sh); overrides: model config overrides (model.KEY=VALUE).
    """
    import torch
    from esm.sdk.api import GenerationConfig

    from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
    from esm3_jax.compat.reference import attach_generation_tokenizers, build_reference_esm3
    from esm3_jax.inference.forward import make_forward
    from esm3_jax.inference.generate import TRACKS, generate
    from esm3_jax.model.flops import forward_flops_per_token

    if track not in BENCH_TRACKS:
        raise ValueError(f"track must be one of {BENCH_TRACKS}, got '{track}'")
    strategy, temperature, annealing = SAMPLINGS[sampling]
    os.environ["DISABLE_ITERATIVE_SAMPLING_TQDM"] = "1"
    cfg = load_config(resolve_config_path(config), list(overrides)).model
    lengths = [int(n) for n in lengths]
    B, Lmax = len(lengths), max(lengths)
    dtype = jnp.dtype(cfg.dtype).name
    proteins = bench_proteins(lengths, track, seed)
    inputs = stack_proteins(proteins)
    spec = TRACKS[track]
    print(f"config {config}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.v_heads} geometric heads, "
          f"{cfg.param_count():,} params; {B} proteins of lengths {lengths} (BOS/EOS included), track {track} "
          f"masked at every residue, {num_steps} steps, cosine schedule, {sampling} sampling (strategy {strategy}, "
          f"temperature {temperature}, annealing {annealing}); other tracks given: "
          f"{', '.join(k for k in inputs if k != spec.key)}; {dtype}, {jax.devices()[0].platform}")

    ref_model, state = reference or build_reference_esm3(cfg.d_model, cfg.n_heads, cfg.v_heads, cfg.n_layers)
    ref_model = ref_model.to(device)
    attach_generation_tokenizers(ref_model)
    # Same weights on both sides: the reference's random init, converted.
    # (in the config's layer layout: `small` keeps its blocks unscanned)
    params = jax.device_put(torch_to_esm3_params(state, infer_esm3_config(
        state, cfg.n_heads, compute_dtype=cfg.compute_dtype, scan_layers=cfg.scan_layers)))
    ref_tensors = [t.to(device) for t in _reference_tensors(proteins)]
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if autocast_bf16 else contextlib.nullcontext

    def run_ours():
        return generate(cfg, params, inputs, track, num_steps, strategy=strategy, temperature=temperature,
                        temperature_annealing=annealing, seed=seed)[spec.key]

    ref_record: dict = {}
    original_logits = ref_model.logits

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def counted_logits(*a, **kw):  # the reference's one forward pass per step (_batch_forward)
        t0 = time.perf_counter()
        out = original_logits(*a, **kw)
        sync()
        ref_record["passes"] = ref_record.get("passes", 0) + 1
        ref_record["seconds"] = ref_record.get("seconds", 0.0) + time.perf_counter() - t0
        return out

    ref_model.logits = counted_logits

    def run_ref():
        # Fresh configs each call: batch_generate caps their num_steps in place.
        configs = [GenerationConfig(track=track, num_steps=num_steps, schedule="cosine", strategy=strategy,
                                    temperature=temperature, temperature_annealing=annealing,
                                    condition_on_coordinates_only=False) for _ in proteins]
        with torch.no_grad(), autocast():
            out = ref_model.batch_generate([t for t in ref_tensors], configs)
        return [getattr(o, track).cpu().numpy() for o in out]  # .cpu() waits for the device

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    with _counting_our_steps({}) as our_first:
        ours, t_first = timed(run_ours)
    ref_record.clear()
    theirs, t_ref_first = timed(run_ref)
    ref_passes = ref_record["passes"]
    peak, best, best_ref, ref_forward_s = 0.0, float("inf"), float("inf"), 0.0
    for _ in range(repeats):
        peak = max(peak, matmul_peak_flops(dtype, repeats=2))
        best = min(best, timed(run_ours)[1])
        ref_record.clear()
        t = timed(run_ref)[1]
        if t < best_ref:
            best_ref, ref_forward_s = t, ref_record["seconds"]

    # Where our time goes: one more run with every step waited for, and our forward alone on the
    # step's very inputs (the step = this forward + sampling and unmasking on the device).
    with _counting_our_steps({}, block=True) as profile:
        t_prof = timed(run_ours)[1]
    p_args = profile["args"]
    x = {**p_args[1], spec.key: p_args[2]}
    fwd = make_forward(cfg)
    jax.block_until_ready(fwd(params, x))
    fwd_s = min(timed(lambda: jax.block_until_ready(fwd(params, x)))[1] for _ in range(2))
    rows, Lpad = p_args[2].shape[:2]
    passes = our_first["passes"]
    flops = passes * forward_flops_per_token(cfg, Lpad) * rows * Lpad
    ref_flops = ref_passes * forward_flops_per_token(cfg, Lmax) * B * Lmax

    # Token agreement over the generated positions (1 .. n-2 of each row).
    equal = [np.asarray(ours[i, 1 : n - 1] == theirs[i][1 : n - 1]).reshape(n - 2, -1).all(-1) for i, n in enumerate(lengths)]
    frac = float(np.concatenate(equal).mean())
    longest = [i for i, n in enumerate(lengths) if n == Lmax]
    frac_longest = float(np.concatenate([equal[i] for i in longest]).mean())
    assert not np.any(ours == spec.mask), "esm3-jax left masked positions"

    result = dict(
        jax_proteins_per_s=B / best, reference_proteins_per_s=B / best_ref, speedup=best_ref / best,
        jax_seconds=best, reference_seconds=best_ref, jax_first_call_seconds=t_first,
        jax_compile_seconds=max(t_first - best, 0.0), reference_first_call_seconds=t_ref_first,
        jax_forward_passes=passes, reference_forward_passes=ref_passes,
        jax_mfu=flops / best / peak, reference_mfu=ref_flops / best_ref / peak, peak=peak,
        jax_step_seconds=profile["seconds"] / profile["passes"], jax_forward_seconds=fwd_s,
        jax_profiled_seconds=t_prof, reference_forward_seconds=ref_forward_s / ref_passes,
        token_equal_fraction=frac, token_equal_fraction_longest=frac_longest, row_equal_fractions=[float(e.mean()) for e in equal],
    )
    print(f"matmul peak (XLA, {dtype}, 2048^3, best of {repeats}): {peak / 1e9:.1f} GFLOP/s")
    print(f"esm3-jax : {B / best:7.3f} proteins/s  ({best:.2f} s/batch; first call {t_first:.1f} s, so compile ~"
          f"{result['jax_compile_seconds']:.1f} s; {passes} forward passes over {rows} x {Lpad}, "
          f"{flops / best / 1e9:.1f} GFLOP/s, MFU {100 * flops / best / peak:.1f}%)")
    print(f"reference: {B / best_ref:7.3f} proteins/s  ({best_ref:.2f} s/batch; first call {t_ref_first:.1f} s; "
          f"{ref_passes} forward passes over {B} x {Lmax}, {ref_flops / best_ref / 1e9:.1f} GFLOP/s, "
          f"MFU {100 * ref_flops / best_ref / peak:.1f}%; torch {torch.__version__}, "
          f"{'bf16 autocast on ' + device if autocast_bf16 else device + ', ' + str(torch.get_num_threads()) + ' threads'})")
    print(f"speedup esm3-jax / reference: {best_ref / best:.2f}x (best of {repeats} alternating rounds each)")
    ref_host = best_ref - ref_forward_s
    print(f"where the time goes: reference {ref_forward_s / ref_passes * 1e3:.0f} ms per forward pass x {ref_passes} = "
          f"{ref_forward_s:.2f} s, host-side sampling loop {ref_host:.2f} s ({100 * ref_host / best_ref:.0f}%); "
          f"esm3-jax {result['jax_step_seconds'] * 1e3:.0f} ms per step (forward alone {fwd_s * 1e3:.0f} ms, the rest "
          f"sampling and unmasking on the device) x {profile['passes']} = {profile['seconds']:.2f} s of a "
          f"{t_prof:.2f} s run with every step waited for")
    print(f"tokens ({sampling} settings): {100 * frac:.1f}% of generated positions equal to the reference's, "
          f"{100 * frac_longest:.1f}% in the longest row(s) (per row: "
          f"{', '.join(f'{n}: {100 * e.mean():.0f}%' for n, e in zip(lengths, equal))}). "
          + ("Rows shorter than the longest may differ: the reference's batch_generate passes no sequence_id, "
             "so its shorter rows attend to their padding; ours keep padding out."
             if sampling == "deterministic" else "Random draws differ between the implementations: equality is not expected."))
    return result
