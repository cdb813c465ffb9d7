"""The CPU matmul library is a per-program compiler option: Eigen takes the plain matmuls,
YNNPACK keeps its reduction fusions, XLA's default is left untouched, and the bench's matmul
peak is the faster library's rate."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax.bench import train_step as bench
from esm3_jax.runtime import cpu_matmul


def _ynn_fusions(compiled_text: str) -> list[str]:
    """The ops inside each YNNPACK fusion of an optimized HLO module, one sorted string per fusion."""
    bodies = dict(re.findall(r"^%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", compiled_text, re.M | re.S))
    calls = re.findall(r"fusion\(.*?calls=%([\w.]+), .*?__ynn_fusion", compiled_text)
    return [" ".join(sorted(set(re.findall(r"= \S+ ([a-z][\w-]*)\(", bodies[c])) - {"parameter"})) for c in calls]


def _compiled(fn, library, *args):
    options = cpu_matmul.compiler_options("cpu", library)
    return jax.jit(fn, compiler_options=options).lower(*args).compile()


def test_options_only_on_the_cpu_and_only_for_eigen():
    assert cpu_matmul.compiler_options("cpu", "eigen") == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert cpu_matmul.compiler_options("cpu", "ynn") is None  # XLA's own default
    assert cpu_matmul.compiler_options("gpu", "eigen") is None
    assert cpu_matmul.compiler_options("tpu", "eigen") is None
    with pytest.raises(ValueError, match="unknown CPU matmul library 'mkl'"):
        cpu_matmul.compiler_options("cpu", "mkl")


def test_eigen_takes_the_matmuls_and_ynnpack_keeps_the_reductions():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(256, 256)), jnp.float32)

    def layer(x, w):  # a matmul and a layer norm's statistics
        y = x @ w
        return (y - y.mean(-1, keepdims=True)) * jax.lax.rsqrt(y.var(-1, keepdims=True) + 1e-5)

    default = _compiled(layer, "ynn", x, w)
    eigen = _compiled(layer, "eigen", x, w)
    if not any("dot" in f for f in _ynn_fusions(default.as_text())):
        pytest.skip("this XLA build does not hand matmuls to YNNPACK")
    assert not any(f == "dot" for f in _ynn_fusions(eigen.as_text()))
    assert re.search(r"= f32\[64,256\]\{1,0\} dot\(", eigen.as_text()), "the matmul is a plain (Eigen) dot thunk"
    np.testing.assert_allclose(np.asarray(eigen(x, w)), np.asarray(default(x, w)), rtol=2e-4, atol=2e-4)


def test_train_step_compiles_its_matmuls_for_eigen():
    from esm3_jax.train.config import load_config
    from esm3_jax.model.esm3 import ESM3
    from esm3_jax.train import optim, sharding as shd, state as st, step as stp

    cfg = load_config(bench.resolve_config_path("tiny"), ["model.n_layers=1"])
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = cfg.mesh.rules.as_flax_rules()
    model, tx = ESM3(cfg.model), optim.make_optimizer(cfg.train)
    abstract, sh = st.state_shardings(model, tx, mesh, rules)
    host = bench.synthetic_train_batch(2, 32)
    bsh = shd.batch_shardings(host, mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k]) for k, v in host.items()}
    texts = {}
    for lib in cpu_matmul.LIBRARIES:
        step = stp.jit_train_step(stp.make_train_step(model, tx, loss_weights=cfg.train.loss_weights.as_dict(),
                                                      grad_accum_steps=1, mesh=mesh, rules=rules),
                                  sh, bsh, mesh, rules, cpu_matmul=lib)
        texts[lib] = step.lower(abstract, batch).compile().as_text()
    if "dot" not in _ynn_fusions(texts["ynn"]):
        pytest.skip("this XLA build does not hand matmuls to YNNPACK")
    assert "dot" not in _ynn_fusions(texts["eigen"])


def test_matmul_rates_cover_both_libraries():
    rates = bench.matmul_rates(n=256, repeats=2)
    assert set(rates) == set(cpu_matmul.LIBRARIES) and all(r > 0 for r in rates.values())


def test_bench_times_two_variants_side_by_side_and_they_train_alike():
    r = bench.bench_train_step("tiny", batch=2, length=32, steps=2, overrides=("model.n_layers=1",),
                               verbose=False, against=("train.cpu_matmul=ynn",), peak=1e11)
    for res in (r, r["against"]):
        assert res["step_s"] > 0 and 0 < res["mfu"] and np.isfinite(res["loss"])
        assert res["flops_per_step"] == r["flops_per_step"] and res["peak"] == r["peak"]
    # Each variant was compiled from its own overrides: the shared one in both, `against` in one.
    assert r["config"].model.n_layers == r["against"]["config"].model.n_layers == 1
    assert (r["config"].train.cpu_matmul, r["against"]["config"].train.cpu_matmul) == ("eigen", "ynn")
    # Same init, same batch, same number of steps: the two matmul libraries differ only in rounding.
    np.testing.assert_allclose(r["against"]["loss"], r["loss"], rtol=1e-4)


def test_bench_counts_each_variants_own_flops(monkeypatch, capsys):
    """A variant that changes the model is held against its own FLOP count, not the first one's.

    The compiled step is replaced by a no-op (the test above runs real ones): only the
    accounting is under test here, and compiling two more train steps would cost CI ~45 s."""
    from esm3_jax.train.config import load_config
    from esm3_jax.model.flops import train_flops_per_token

    def fake_compiled_step(config, overrides, batch, length):
        cfg = load_config(bench.resolve_config_path(config), list(overrides))
        return dict(cfg=cfg, step=lambda s, x: (s, {"loss": np.float32(1.0)}), state=None,
                    metrics={"loss": np.float32(1.0)}, x=None, compile_s=0.0, times=[])

    monkeypatch.setattr(bench, "_compiled_train_step", fake_compiled_step)
    r = bench.bench_train_step("tiny", batch=2, length=16, steps=2, overrides=("model.n_layers=2",),
                               verbose=True, against=("model.n_layers_geom=0",), peak=1e11)
    for res in (r, r["against"]):
        assert res["flops_per_step"] == train_flops_per_token(res["config"].model, 16) * 2 * 16
        np.testing.assert_allclose(res["mfu"], res["flops_per_step"] / res["step_s"] / 1e11, rtol=1e-12)
    assert r["against"]["config"].model.n_layers_geom == 0 and r["against"]["flops_per_step"] < r["flops_per_step"]
    flops_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model FLOPs"))
    assert flops_line.count(" GFLOP [") == 2, flops_line
