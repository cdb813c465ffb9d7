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
    assert train["batch"] == 4 and train["tokens_per_s"] > 0 and train["remat"] == "full"
    assert 0 < train["mfu_vs_measured_matmul"] and train["loss"] > 0
    assert ref["forward"]["speedup"] > 0 and ref["generate"]["speedup"] > 0
    # bf16 on both sides: the logits agree to bf16's precision, not better.
    assert max(ref["forward"]["max_relative_error"].values()) < 0.1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_step"]["tokens_per_s"] == train["tokens_per_s"] and not summary["errors"]
