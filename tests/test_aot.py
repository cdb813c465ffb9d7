"""Ahead-of-time compilation of the real train step for a TPU slice, on this CPU machine.

Needs libtpu (`pip install libtpu`, the `tpu-aot` extra); skipped without it. 1-6 min: three compiles
of the tiny train step for v5p-8 (the unrolled one is the slow one), and a few one-matmul programs
for the FLOP count.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
from tests.paths import REPO


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
    # No remat here: the compiled matmuls are the analytic count plus what it leaves out, at this
    # width mostly the residue-annotation projection (1478 x d, ~8 % of the tiny model's count).
    ratio = float(line.split("(ratio ")[1].split(")")[0])
    assert 1.0 < ratio < 1.2, line
    assert "loops of unknown trip count" not in line


def test_scanned_and_unrolled_train_steps_have_the_same_matmul_count():
    """The scan's trip count is read from the HLO: the scanned step counts as many matmul FLOPs
    as the same step unrolled (remat recomputation included); XLA's cost analysis does not."""
    import dataclasses

    from esm3_jax.model import flops
    from esm3_jax.train.config import load_config
    from esm3_jax.train import aot

    counts = {}
    for scan, remat in (("true", "full"), ("false", "full"), ("true", "none")):
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.n_layers=3", "data.batch_size=8",
                                                           "data.max_length=64", f"model.remat={remat}",
                                                           f"model.scan_layers={scan}"])
        r = aot.run_aot(cfg, "v5p-8")
        assert r["loops_without_trip_count"] == []
        counts[scan, remat] = (r["flops_per_chip"], r["flops_per_chip_xla"], r["analytic_flops_per_chip"])
    (scanned, scanned_xla, analytic), (unrolled, unrolled_xla, _) = counts["true", "full"], counts["false", "full"]
    assert scanned == unrolled
    assert scanned_xla < unrolled_xla  # one of the two scanned bodies is counted once, not 3 times
    # Full remat recomputes each block's forward once, less what the backward never reads: the
    # attention-output and FFN-down projections (their inputs are kept, their outputs are not
    # needed). So the extra matmuls lie between the block forward without those two and all of it.
    no_remat = counts["true", "none"][0]
    m, tokens = cfg.model, 2 * 64  # 2 sequences of 64 per chip
    block_forward = tokens * (flops.forward_flops_per_token(m, 64)
                              - flops.forward_flops_per_token(dataclasses.replace(m, n_layers=0), 64))
    without_outputs = block_forward - tokens * m.n_layers * 2 * (m.d_model * m.d_model + m.d_model * m.ffn_hidden)
    assert without_outputs < scanned - no_remat < block_forward, (scanned, no_remat, without_outputs, block_forward)
    assert 1.0 < no_remat / analytic < 1.2


def _compile_for(topology, fn, *shapes_specs):
    """(XLA cost analysis FLOPs, matmul FLOPs from the dumped HLO) of `fn` compiled for a slice."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding

    from esm3_jax.train import aot

    _, devices = aot.topology_devices(topology)
    mesh = Mesh(np.array(devices), ("x",))
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for shape, spec in shapes_specs]
    with tempfile.TemporaryDirectory() as d:
        compiled = jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": d, "xla_dump_hlo_as_text": True})
        text = aot._dumped_module(d)
    flops, unknown = aot.hlo_matmul_flops(text)
    assert unknown == []
    return aot._flops(compiled), flops, text


def test_fsdp_matmul_on_v5p_64_is_a_windowed_einsum_that_cost_analysis_counts_an_eighth_of():
    """The 98B FLOPs puzzle in one matmul: activations split by batch, the weight by its input
    dimension over 32 chips. SPMD makes the all-gather + matmul a bidirectional windowed einsum,
    a while loop of 8 iterations (4 of the 32 weight shards each); XLA's cost analysis counts
    the loop body once. On v5p-8 the same matmul is one plain dot."""
    from jax.sharding import PartitionSpec as P

    d, f, length = 1536, 4096, 2048
    matmul = lambda x, w: x @ w
    for topology, chips in (("v5p-64", 32), ("v5p-8", 4)):
        xla, hlo, text = _compile_for(topology, matmul, ((chips, length, d), P("x")), ((d, f), P("x")))
        assert hlo == 2 * length * d * f  # one sequence per chip, every weight shard once
        if chips == 32:
            assert "windowed_dot_general_body_ag" in text
            assert 0.12 < xla / hlo < 0.13  # 1/8, plus the loop's index arithmetic
        else:
            assert "windowed_dot_general" not in text and xla == hlo


def test_scanned_matmul_counted_once_per_iteration():
    from jax import lax
    from jax.sharding import PartitionSpec as P

    body = lambda c, _: (c @ c, None)
    xla, hlo, _ = _compile_for("v5p-8", lambda c: lax.scan(body, c, None, length=7)[0], ((256, 256), P()))
    assert hlo == 7 * 2 * 256**3 and xla == 2 * 256**3


def test_matmul_count_of_a_hand_written_module():
    """Trip count from `i < N` with i's start and step in the loop, a fusion, a kernel call (not
    a matmul the count can see, so counted apart), and a dot written
    as a convolution (as libtpu does): a width-1 input padded to 3 under a reversed window of 2,
    so each of the 2 outputs reads one kernel position, i.e. (8 x 16) @ (16 x 2*4)."""
    from esm3_jax.train import aot

    text = """
HloModule m

%fused (p0: f32[8,1,16], p1: f32[16,2,4]) -> f32[8,2,4] {
  %p0 = f32[8,1,16]{2,1,0} parameter(0)
  %p1 = f32[16,2,4]{2,1,0} parameter(1)
  ROOT %convolution.1 = f32[8,2,4]{2,1,0} convolution(%p0, %p1), window={size=2 pad=1_1 rhs_reversal=1}, dim_labels=b0f_i0o->b0f
}

%body (p: (s32[], f32[8,1,16], f32[16,2,4])) -> (s32[], f32[8,1,16], f32[16,2,4]) {
  %p = (s32[], f32[8,1,16]{2,1,0}, f32[16,2,4]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %x = f32[8,1,16]{2,1,0} get-tuple-element(%p), index=1
  %w = f32[16,2,4]{2,1,0} get-tuple-element(%p), index=2
  %fusion.1 = f32[8,2,4]{2,1,0} fusion(%x, %w), kind=kOutput, calls=%fused
  %kernel.1 = f32[8,1,16]{2,1,0} custom-call(%x), custom_call_target="tpu_custom_call"
  ROOT %t = (s32[], f32[8,1,16]{2,1,0}, f32[16,2,4]{2,1,0}) tuple(%next, %x, %w)
}

%cond (p: (s32[], f32[8,1,16], f32[16,2,4])) -> pred[] {
  %p = (s32[], f32[8,1,16]{2,1,0}, f32[16,2,4]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(9)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,1,16], b: f32[16,2,4], c: f32[8,16], d: f32[16,32]) -> f32[8,32] {
  %a = f32[8,1,16]{2,1,0} parameter(0)
  %b = f32[16,2,4]{2,1,0} parameter(1)
  %c = f32[8,16]{1,0} parameter(2)
  %d = f32[16,32]{1,0} parameter(3)
  %one = s32[] constant(1)
  %init = (s32[], f32[8,1,16]{2,1,0}, f32[16,2,4]{2,1,0}) tuple(%one, %a, %b)
  %while.1 = (s32[], f32[8,1,16]{2,1,0}, f32[16,2,4]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %dot.1 = f32[8,32]{1,0} dot(%c, %d), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    per_iteration = 2 * 8 * 16 * (2 * 4)
    flops, unknown = aot.hlo_matmul_flops(text)
    assert unknown == []
    assert flops == 4 * per_iteration + 2 * 8 * 16 * 32  # i = 1, 3, 5, 7
    assert aot.hlo_kernel_calls(text) == 4  # the kernel in the loop body, once per iteration


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
