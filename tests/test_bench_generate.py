"""`esm3-jax bench generate` (esm3_jax/bench/generate.py) runs end to end at the tiny config and
returns its numbers; no timing is asserted (the machine may be shared)."""

from __future__ import annotations

import numpy as np

from tests.reference import import_reference


def test_bench_generate_tiny(capsys):
    import_reference()
    from esm3_jax.bench.generate import bench_generate

    r = bench_generate("tiny", lengths=(20, 33), num_steps=2, track="sequence", repeats=1)
    assert r["jax_proteins_per_s"] > 0 and r["reference_proteins_per_s"] > 0
    assert np.isfinite(r["speedup"]) and r["speedup"] > 0
    assert 0.0 <= r["token_equal_fraction"] <= 1.0
    # The longest row has no padding, so the deterministic settings give the reference's tokens.
    assert r["token_equal_fraction_longest"] == 1.0
    assert r["jax_forward_passes"] == r["reference_forward_passes"] == 2
    assert r["jax_compile_seconds"] >= 0 and r["jax_step_seconds"] > 0 and r["reference_forward_seconds"] > 0
    out = capsys.readouterr().out
    assert "speedup esm3-jax / reference" in out and "proteins/s" in out and "attend to their padding" in out
