"""`esm3-jax bench forward`: the ESM3 forward pass against the reference on the same config,
weights and inputs, and against the matmul rate measured in the same run."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.batch import random_inputs
from esm3_jax.inference.forward import make_forward
from esm3_jax.runtime.hardware import matmul_peak_flops, time_fn
from esm3_jax.train.config import load_config, resolve_config_path


def bench_forward(config: str, batch: int, length: int, repeats: int, reference: bool = True) -> dict:
    """esm3-jax vs the reference forward on identical config, weights and inputs.

    The two are timed in alternating rounds and each keeps its best round, so a machine that is
    busy for a while slows both alike; the matmul peak is re-measured alongside and its best kept.
    """
    import flax.linen as nn

    from esm3_jax.model.flops import forward_flops_per_token
    from esm3_jax.model.esm3 import init_params

    cfg = load_config(resolve_config_path(config)).model
    dtype = jnp.dtype(cfg.dtype).name
    inputs = random_inputs(batch, length)
    tokens = batch * length
    flops = forward_flops_per_token(cfg, length) * tokens
    print(f"config {config}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.v_heads} geometric heads, {cfg.param_count():,} params; batch {batch} x {length}, "
          f"every track + coordinates, {dtype}, {jax.devices()[0].platform}")

    if reference:
        from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
        from esm3_jax.compat.reference import build_reference_esm3, reference_forward, to_torch_inputs

        ref_model, state = build_reference_esm3(cfg.d_model, cfg.n_heads, cfg.v_heads, cfg.n_layers)
        # Same weights on both sides: the reference's random init, converted.
        params = torch_to_esm3_params(state, infer_esm3_config(state, cfg.n_heads, compute_dtype=cfg.compute_dtype,
                                                                      scan_layers=cfg.scan_layers))
    else:
        params = nn.unbox(init_params(cfg, jax.random.key(0)))
    fwd = make_forward(cfg)  # the very function `esm3-jax forward` runs
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    t_compile = time.perf_counter()
    ours = jax.tree.map(np.asarray, fwd(params, x))
    t_compile = time.perf_counter() - t_compile
    run_ours = lambda: jax.block_until_ready(fwd(params, x))
    result: dict = {}
    if reference:
        import torch

        tin = to_torch_inputs(inputs)
        theirs = reference_forward(ref_model, inputs)
        err = max(float(np.max(np.abs(ours[k] - theirs[k])) / np.max(np.abs(theirs[k]))) for k in theirs)

        def run_ref():
            with torch.no_grad():
                ref_model(**tin)

        run_ref()
    run_ours()
    peak, best, best_ref = 0.0, float("inf"), float("inf")
    for _ in range(repeats):
        peak = max(peak, matmul_peak_flops(dtype, repeats=2))
        best = min(best, time_fn(run_ours, 1, warmup=0))
        if reference:
            best_ref = min(best_ref, time_fn(run_ref, 1, warmup=0))
    print(f"matmul peak (XLA, {dtype}, 2048^3, best of {repeats}): {peak / 1e9:.1f} GFLOP/s")
    print(f"esm3-jax : {tokens / best:9.1f} tokens/s  ({best * 1e3:.0f} ms/batch, compile {t_compile:.1f} s, "
          f"{flops / best / 1e9:.1f} GFLOP/s, MFU {100 * flops / best / peak:.1f}%)")
    result.update(jax_tokens_per_s=tokens / best, jax_mfu=flops / best / peak, peak=peak)
    if reference:
        result.update(reference_tokens_per_s=tokens / best_ref, reference_mfu=flops / best_ref / peak,
                      speedup=best_ref / best, max_relative_error=err)
        print(f"reference: {tokens / best_ref:9.1f} tokens/s  ({best_ref * 1e3:.0f} ms/batch, "
              f"{flops / best_ref / 1e9:.1f} GFLOP/s, MFU {100 * flops / best_ref / peak:.1f}%; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"speedup esm3-jax / reference: {best_ref / best:.2f}x over {repeats} alternating rounds "
              f"(outputs agree: max relative error {err:.1e})")
    return result
