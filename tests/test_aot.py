"""Ahead-of-time compilation of the real train step for a TPU slice, on this CPU machine.

Needs libtpu (`pip install libtpu`, the `tpu-aot` extra); skipped without it. ~30-60 s: one compile
of the tiny model for v5p-8, plus two shallow compiles for the scanned-layer FLOP correction.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install libtpu)")


def test_topology_table_names_resolve():
    from esm3_jax.train.aot import TOPOLOGIES, topology_devices

    assert TOPOLOGIES["v5p-256"].libtpu_name == "v5:4x4x8" and TOPOLOGIES["v5p-8"].libtpu_name == "v5:2x2x1"
    for name, chips in (("v5p-8", 4), ("v5p-64", 32), ("v5e-16", 16)):
        _, devices = topology_devices(name)
        assert len(devices) == chips, name
    with pytest.raises(ValueError, match="unknown topology 'v5p-7'"):
        topology_devices("v5p-7")


def test_aot_compiles_the_tiny_train_step_for_v5p_8():
    # Run as the user would, in a fresh process: libtpu and JAX_PLATFORMS=cpu must coexist.
    out = subprocess.run(
        [sys.executable, "-m", "esm3_jax.cli", "aot", "--config", str(REPO / "configs" / "tiny.yaml"),
         "--topology", "v5p-8", "model.n_layers=3", "data.batch_size=8", "data.max_length=64"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = out.stdout
    assert "topology: v5p-8 (libtpu v5:2x2x1), 4 chips" in report
    assert "mesh: data=4 x fsdp=1 x tensor=1 (4 devices)" in report
    assert report.strip().splitlines()[-1] == "fits: yes"
    line = next(l for l in report.splitlines() if l.startswith("FLOPs per step per chip"))
    # Scan-corrected XLA count vs the analytic count: same order (XLA also counts elementwise
    # work, the embedding's one-hot matmul and the optimizer update).
    ratio = float(line.rsplit("ratio ", 1)[1].rstrip(")"))
    assert 0.8 < ratio < 2.5, line
    raw = float(line.split("(raw ")[1].split(",")[0])
    corrected = float(line.split("chip: ")[1].split(" ")[0])
    assert corrected > raw  # 2 scanned layers: one more body than XLA counted


def test_compile_time_oom_message_is_read():
    """libtpu's CompileTimeHbmOom text (as printed for the 98B step on v5p-32) gives the numbers."""
    from esm3_jax.train import aot

    msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
           "required for HLO temporaries (116.00G) exceeds available HBM (95.73G). HLO module: jit_train_step.")
    m = aot._OOM.search(msg)
    assert aot._to_bytes(m.group(1), m.group(2)) == 116 * 2**30
    assert aot._to_bytes(m.group(3), m.group(4)) == 95.73 * 2**30
    report = aot.format_report(dict(topology="v5p-32", libtpu_topology="v5:2x2x4", chips=16,
                                    hbm_per_chip=aot.TOPOLOGIES["v5p-32"].hbm_bytes, mesh="fsdp=16",
                                    params=98_191_886_404, compile_s=12.0, fits=False, error=msg,
                                    temp_bytes=116 * 2**30))
    assert "temporaries 116.00 GiB > HBM 95.74 GiB" in report and report.endswith("fits: no")
