"""The GPU check that launch/gpu_check.sh runs: one short slot on one NVIDIA GPU, spent measuring.

    python -m esm3_jax.bench.gpu_check STAGE OUTDIR [--dry-run]

Three stages, each its own process (the script runs them in turn, each under a time limit), each
writing OUTDIR/STAGE.json, so that one that fails or runs out of time leaves the others' numbers:

  matmul      the card's bf16 matmul rate through XLA (JAX only: no torch in the process)
  train-step  the 1.4B config's train step at length 2048, bf16, cuDNN attention, with the first
              (remat, batch) of a short list, fastest expected first, that the compiled step's
              memory analysis says fits; its MFU
              against the matmul rate measured by the first stage and against the datasheet peak
  reference   the forward pass and batch generation of the 1.4B config against the reference `esm`
              ESM3 on the same GPU (the reference in bf16 autocast, as its own ESM3.logits runs
              it there; fp32 in a dry run on the CPU, where it does not support bf16 autocast),
              same weights and inputs; torch's own bf16 matmul rate beside them

--dry-run runs the same code on the CPU with tiny shapes (a tiny config, short rows, small
matmuls, plain XLA attention), so that the path is known to work before a GPU ever sees it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

STAGES = ("matmul", "train-step", "reference")

# The shapes of a real check and of a dry run. One dict each, so that a dry run differs only here.
# The train step's (remat, batch) candidates, in the order of their expected speed: the first that
# fits is measured. Saving the matmul outputs ("minimal") spares recomputing a block's forward (a
# third more FLOPs under "full"); at the 1.4B config and length 2048 it keeps ~38 KB per token
# and layer, ~3.7 GB per row, so a batch of 8 (~30 GB) is the estimate that fits in 80 GB beside
# the 22 GB of fp32 parameters, gradients and Adam moments.
REAL = dict(matmul_n=8192, config="esm3_open_1.4b", overrides=("model.attention=cudnn",),
            length=2048, candidates=("minimal:8", "full:16", "full:8", "full:4", "full:2", "full:1"), steps=5,
            forward_batch=8, forward_length=1024, gen_lengths=(64, 91, 119, 146, 174, 201, 229, 256), gen_steps=16,
            repeats=3, memory_headroom=0.9)
DRY = dict(matmul_n=256, config="tiny", overrides=("model.attention=xla", "model.compute_dtype=bfloat16"),
           length=64, candidates=("minimal:4", "full:4", "full:2"), steps=2, forward_batch=2, forward_length=32,
           gen_lengths=(16, 24), gen_steps=4, repeats=1, memory_headroom=0.9)


def train_candidates(shapes: dict) -> list[tuple[str, int]]:
    return [(remat, int(batch)) for remat, batch in (c.split(":") for c in shapes["candidates"])]


def environment() -> dict:
    import jax

    env = dict(python=platform.python_version(), jax=jax.__version__, backend=jax.default_backend(),
               devices=[d.device_kind for d in jax.devices()], host=platform.node())
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    return env


def stage_matmul(shapes: dict, out: Path) -> dict:
    import jax.numpy as jnp

    from esm3_jax.runtime.hardware import matmul_rates, peak_flops_per_device
    import jax

    n = shapes["matmul_n"]
    rate = max(matmul_rates("bfloat16", n=n, repeats=10).values())
    kind = jax.devices()[0].device_kind
    return dict(bf16_matmul_flops=rate, n=n, dtype=jnp.dtype(jnp.bfloat16).name,
                datasheet_bf16_flops=peak_flops_per_device(kind), device_kind=kind)


def _device_bytes_limit(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def cudnn_attention_calls(hlo_text: str) -> dict:
    """The cuDNN attention custom calls in a lowered program: forward and backward call sites, and
    how many backward calls also compute the bias gradient. JAX before jax-ml/jax#39512 (merged
    2026-07-31, after 0.11.0) turns a boolean mask into an additive bias and computes its
    (B, 1, L, L) gradient in every layer's backward though nothing can use it."""
    calls = [line for line in hlo_text.splitlines() if "custom_call @__cudnn$fmha" in line]
    backward = [line for line in calls if "Backward" in line.split("(", 1)[0]]
    # A backward call returns (dQ, dK, dV, [dbias,] workspace).
    with_dbias = sum(line.rsplit("-> ", 1)[-1].count("tensor<") == 5 for line in backward)
    return dict(forward=len(calls) - len(backward), backward=len(backward), backward_with_bias_gradient=with_dbias)


def stage_train_step(shapes: dict, out: Path) -> dict:
    """The real train step (train/setup.py's), compiled ahead of time per (remat, batch) candidate
    until one fits the device's memory (by XLA's own memory analysis), then timed. With the configured
    attention first, then plain XLA attention should that fail: a number either way, and why."""
    from esm3_jax.train.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(shapes["config"]),
                      [*shapes["overrides"], "train.grad_accum_steps=1", "train.seed=0"])
    errors = {}
    for attention in dict.fromkeys((cfg.model.attention, "xla")):
        try:
            result = _fit_and_time_train_step(_with_model(cfg, attention=attention), shapes, out)
        except Exception as e:
            errors[attention] = f"{type(e).__name__}: {str(e)[:500]}"
            continue
        return dict(result, attention_errors=errors) if errors else result
    raise RuntimeError(f"the train step failed with every attention: {errors}")


def _with_model(cfg, **changes):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def _fit_and_time_train_step(cfg, shapes: dict, out: Path) -> dict:
    import jax
    import numpy as np

    from esm3_jax.batch import synthetic_train_batch
    from esm3_jax.model.flops import train_flops_per_token
    from esm3_jax.runtime.hardware import peak_flops_per_device
    from esm3_jax.train.setup import setup_training

    length = shapes["length"]
    device = jax.devices()[0]
    runs = {}  # remat -> its setup; the state is the same for every remat policy
    state = None
    limit = _device_bytes_limit(device)
    tried, attention_calls = [], None
    for remat, batch in train_candidates(shapes):
        if remat not in runs:
            runs[remat] = setup_training(_with_model(cfg, remat=remat), [device])
        run = runs[remat]
        state = state if state is not None else run.fresh_state()
        host = synthetic_train_batch(batch, length)
        bsh = run.batch_shardings(host)
        x = {k: jax.device_put(v, bsh[k]) for k, v in host.items()}
        t0 = time.perf_counter()
        lowered = run.train_step(bsh).lower(state, x)
        if attention_calls is None:  # the same attention in every candidate: count it once
            attention_calls = cudnn_attention_calls(lowered.as_text())
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        # Arguments (state and batch) + temporaries; outputs alias the donated state.
        need = None if mem is None else int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                             + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        tried.append(dict(remat=remat, batch=batch, bytes_needed=need, compile_s=compile_s))
        if limit is not None and need is not None and need > shapes["memory_headroom"] * limit:
            continue
        try:
            state, m = compiled(state, x)
            jax.block_until_ready(m)
        except Exception as e:  # an estimate that was wrong: out of memory at run time
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            tried[-1]["error"] = str(e).splitlines()[0][:300]
            state = run.fresh_state()  # the donated state may be gone
            continue
        break
    else:
        raise RuntimeError(f"no (remat, batch) of {shapes['candidates']} fits: {tried}")
    state, m = compiled(state, x)  # one more untimed step
    jax.block_until_ready(m)
    times = []
    for _ in range(shapes["steps"]):
        t0 = time.perf_counter()
        state, m = compiled(state, x)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = batch * length
    model = run.cfg.model  # the measured candidate's remat
    flops = train_flops_per_token(model, length) * tokens
    result = dict(config=shapes["config"], overrides=list(shapes["overrides"]), length=length, batch=batch,
                  tokens_per_step=tokens, params=model.param_count(), dtype=str(np.dtype(model.dtype)),
                  attention=model.attention, cudnn_attention_calls=attention_calls, remat=model.remat,
                  step_s=step_s, step_times=times,
                  tokens_per_s=tokens / step_s, model_flops_per_step=flops, model_flops_per_s=flops / step_s,
                  loss=float(m["loss"]), device_bytes_limit=limit, candidates=tried)
    matmul = out / "matmul.json"
    if matmul.is_file():
        rate = (json.loads(matmul.read_text()).get("result") or {}).get("bf16_matmul_flops")
        if rate:
            result.update(bf16_matmul_flops=rate, mfu_vs_measured_matmul=flops / step_s / rate)
    peak = peak_flops_per_device(device.device_kind)
    if peak:
        result.update(datasheet_bf16_flops=peak, mfu_vs_datasheet=flops / step_s / peak)
    return result


def _forward_vs_reference(cfg, ref_model, params, batch: int, length: int, repeats: int, device: str) -> dict:
    """The forward pass on the same weights and inputs: esm3-jax (the `forward` verb's function)
    against the reference in bf16 autocast on `device`, alternating rounds, best of each."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from esm3_jax.batch import random_inputs
    from esm3_jax.compat.reference import OUTPUT_NAMES, to_torch_inputs
    from esm3_jax.inference.forward import make_forward
    from esm3_jax.model.flops import forward_flops_per_token

    inputs = random_inputs(batch, length)
    fwd = make_forward(cfg)
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    tin = {k: v.to(device) for k, v in to_torch_inputs(inputs).items()}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    # bf16 autocast on a GPU, as the reference's own ESM3.logits runs there; on the CPU (a dry
    # run) the reference does not support it and runs in fp32, as its logits() does there too.
    on_gpu = torch.device(device).type == "cuda"

    def run_ref():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            out = ref_model(**tin)
        sync()
        return out

    t0 = time.perf_counter()
    ours = jax.tree.map(np.asarray, fwd(params, x))
    compile_s = time.perf_counter() - t0
    theirs = run_ref()
    # bf16 on both sides, rounded at different points: the error is bf16's, reported, not asserted.
    errors = {}
    for name in OUTPUT_NAMES:
        a, b = ours[name].astype(np.float32), getattr(theirs, name).float().cpu().numpy()
        errors[name] = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
    seq_agree = float(np.mean(ours["sequence_logits"].argmax(-1) == getattr(theirs, "sequence_logits").float().cpu().numpy().argmax(-1)))
    best, best_ref = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, x))
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_ref()
        best_ref = min(best_ref, time.perf_counter() - t0)
    tokens = batch * length
    flops = forward_flops_per_token(cfg, length) * tokens
    return dict(batch=batch, length=length, jax_tokens_per_s=tokens / best, reference_tokens_per_s=tokens / best_ref,
                speedup=best_ref / best, jax_s=best, reference_s=best_ref, jax_compile_s=compile_s,
                model_flops=flops, max_relative_error=errors, sequence_argmax_agreement=seq_agree)


def stage_reference(shapes: dict, out: Path) -> dict:
    import jax
    import torch

    from esm3_jax.bench.generate import bench_generate
    from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
    from esm3_jax.compat.reference import build_reference_esm3
    from esm3_jax.train.config import load_config, resolve_config_path

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    cfg = load_config(resolve_config_path(shapes["config"]), list(shapes["overrides"])).model
    t0 = time.perf_counter()
    ref_model, state = build_reference_esm3(cfg.d_model, cfg.n_heads, cfg.v_heads, cfg.n_layers)
    params = jax.device_put(torch_to_esm3_params(state, infer_esm3_config(
        state, cfg.n_heads, compute_dtype=cfg.compute_dtype, scan_layers=cfg.scan_layers, attention=cfg.attention)))
    ref_model = ref_model.to(device)
    build_s = time.perf_counter() - t0
    result = dict(config=shapes["config"], torch=torch.__version__, torch_device=device, build_s=build_s,
                  reference_dtype="bfloat16 autocast" if device == "cuda" else "float32",
                  jax_dtype=str(jax.numpy.dtype(cfg.dtype)))
    n = shapes["matmul_n"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    result["torch_bf16_matmul_flops"] = 10 * 2 * n**3 / (time.perf_counter() - t0)
    # Each part is tried with the config's attention first, then with plain XLA attention should
    # that fail (e.g. a shape cuDNN's fused kernel does not take): a number either way, and why.
    def with_fallback(name, fn):
        for attention in dict.fromkeys((cfg.attention, "xla")):
            try:
                result[name] = dict(fn(attention), attention=attention)
                return
            except Exception as e:
                result.setdefault("errors", {})[f"{name} ({attention})"] = f"{type(e).__name__}: {str(e)[:500]}"

    overrides = [o for o in shapes["overrides"] if not o.startswith("model.attention=")]
    with_fallback("forward", lambda attention: _forward_vs_reference(
        dataclasses.replace(cfg, attention=attention), ref_model, params, shapes["forward_batch"],
        shapes["forward_length"], shapes["repeats"], device))
    del params
    with_fallback("generate", lambda attention: bench_generate(
        shapes["config"], shapes["gen_lengths"], shapes["gen_steps"], "sequence", "deterministic", shapes["repeats"],
        reference=(ref_model, state), device=device, autocast_bf16=device == "cuda",
        overrides=(*overrides, f"model.attention={attention}")))
    if "forward" not in result or "generate" not in result:
        raise RuntimeError(f"the reference comparison failed: {result.get('errors')}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny shapes")
    args = p.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = DRY if args.dry_run else REAL
    # Knobs for a card that differs from an 80 GB H100 (see README), e.g. GPU_CHECK_CANDIDATES="full:4 full:2".
    if os.environ.get("GPU_CHECK_CANDIDATES"):
        shapes = dict(shapes, candidates=tuple(os.environ["GPU_CHECK_CANDIDATES"].split()))
    record = dict(stage=args.stage, dry_run=args.dry_run, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    try:
        record["environment"] = environment()
        fn = {"matmul": stage_matmul, "train-step": stage_train_step, "reference": stage_reference}[args.stage]
        record["result"] = fn(shapes, out)
        record["ok"] = True
    except Exception as e:  # recorded, so that the slot's other stages and this error both come back
        record.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    record["seconds"] = time.perf_counter() - t0
    import resource  # CPU seconds too: on a shared machine the wall time says little about the cost

    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    (out / f"{args.stage}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}, indent=2, default=str))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
