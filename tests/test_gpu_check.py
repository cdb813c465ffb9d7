"""launch/gpu_check.sh --dry-run: the GPU check's whole code path (matmul rate, the train step
with its batch search, the forward pass and generation against the reference) on the CPU with tiny
shapes, so that a short GPU slot is not the first time this code runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import REPO


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("torch", reason="the reference stage needs torch (pip install -e '.[test]')")
    pytest.importorskip("esm.models.esm3", reason="reference `esm` package not installed")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=1800)
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], logs)
    stages = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in ("matmul", "train-step", "reference")}
    assert all(r["ok"] and r["dry_run"] for r in stages.values()), stages
    matmul, train, ref = (stages[s]["result"] for s in ("matmul", "train-step", "reference"))
    assert matmul["bf16_matmul_flops"] > 0
    # No memory limit on the CPU: the first candidate is measured.
    assert (train["remat"], train["batch"]) == ("minimal", 4) and train["tokens_per_s"] > 0
    assert 0 < train["mfu_vs_measured_matmul"] and train["loss"] > 0
    assert train["attention"] == "xla" and train["cudnn_attention_calls"]["forward"] == 0
    assert ref["forward"]["speedup"] > 0 and ref["generate"]["speedup"] > 0
    # bf16 on both sides: the logits agree to bf16's precision, not better.
    assert max(ref["forward"]["max_relative_error"].values()) < 0.1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_step"]["tokens_per_s"] == train["tokens_per_s"] and not summary["errors"]


def test_cudnn_train_step_lowers_for_cuda(monkeypatch):
    """The GPU check's own train step (the 1.4B config, cuDNN attention, bf16, its first remat
    policy and batch at length 2048) lowered for CUDA on this CPU, cuDNN's version and compute-capability probes
    answered as an H100's: JAX's cuDNN shape and layout checks pass and the attention is cuDNN's,
    forward and backward, before a GPU ever runs it. Likewise the reference stage's forward pass."""
    import jax

    from esm3_jax.batch import synthetic_train_batch
    from esm3_jax.bench import gpu_check
    from esm3_jax.train.config import load_config, resolve_config_path
    from esm3_jax.train.setup import setup_training

    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    probes = ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal")
    if not all(hasattr(fa, name) for name in probes):
        pytest.skip("this JAX probes cuDNN differently")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)  # cuDNN 9.10
    monkeypatch.setattr(fa, "check_compute_capability", lambda c: tuple(map(int, c.split("."))) <= (9, 0))
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda c: c == "9.0")
    shapes = gpu_check.REAL
    remat, batch_size = gpu_check.train_candidates(shapes)[0]
    cfg = load_config(resolve_config_path(shapes["config"]),
                      [*shapes["overrides"], f"model.remat={remat}", "train.grad_accum_steps=1"])
    assert cfg.model.attention == "cudnn"
    run = setup_training(cfg, jax.devices()[:1])
    host = synthetic_train_batch(batch_size, shapes["length"])
    bsh = run.batch_shardings(host)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k]) for k, v in host.items()}
    lowered = run.train_step(bsh).lower(run.abstract_state_with_shardings(), batch, platforms=("cuda",))
    calls = gpu_check.cudnn_attention_calls(lowered.as_text())
    # Layers are scanned: one forward call in the step's forward, the rematerialised one in the
    # backward, and the backward call; a bias gradient in the backward or not, by JAX version.
    assert calls["forward"] >= 2 and calls["backward"] >= 1, calls
    assert calls["backward_with_bias_gradient"] in (0, calls["backward"]), calls
    # The reference stage's forward pass, the same way.
    from esm3_jax.batch import random_inputs
    from esm3_jax.inference.forward import make_forward

    inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in random_inputs(shapes["forward_batch"], shapes["forward_length"]).items()}
    forward = make_forward(cfg.model).trace(run.abstract_state.params, inputs).lower(lowering_platforms=("cuda",))
    calls = gpu_check.cudnn_attention_calls(forward.as_text())
    assert calls["forward"] >= 1 and calls["backward"] == 0, calls
