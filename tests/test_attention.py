"""The attention implementations agree: plain XLA (with its hand-written backward), and the TPU
splash kernel (run by the Pallas interpreter here), on packed rows, also sharded on 8 devices.

The TPU kernel itself is compiled for a real TPU topology in tests/test_aot.py.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.model.config import ModelConfig
from esm3_jax.model.esm3 import ESM3
from esm3_jax.model.layers import dot_product_attention
from tests.reference import relative_error
from tests.paths import REPO

CFG = ModelConfig(d_model=64, n_heads=4, n_layers=2, v_heads=4)
B, L = 4, 128  # the splash kernel's blocks are multiples of 128


def _packed_inputs():
    rng = np.random.default_rng(0)
    seq = rng.integers(4, 24, (B, L)).astype(np.int32)
    # Rows with one, two and three packed sequences.
    starts = np.array([[L, L], [50, L], [40, 90], [10, 100]])
    sid = (np.arange(L)[None, :, None] >= starts[:, None, :]).sum(-1).astype(np.int32)
    return dict(sequence_tokens=jnp.asarray(seq), sequence_id=jnp.asarray(sid))


def _loss_and_grads(attention: str, params, x):
    model = ESM3(dataclasses.replace(CFG, attention=attention))
    loss = lambda p: jnp.sum(jnp.sin(model.apply(p, **x)["sequence_logits"]))
    return jax.jit(jax.value_and_grad(loss))(params)


def test_xla_attention_backward_matches_autodiff():
    rng = np.random.default_rng(1)
    q, k, v, w = (jnp.asarray(rng.normal(size=(2, 16, 3, 8)).astype(np.float32)) for _ in range(4))
    mask = jnp.asarray(rng.random((2, 16, 16)) < 0.7) | jnp.eye(16, dtype=bool)[None]

    def textbook(q, k, v):
        s = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(8.0)
        s = jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, -1), v)

    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
    ours = grad(lambda q, k, v: dot_product_attention(q, k, v, mask))
    for a, b in zip(ours, grad(textbook)):
        assert relative_error(a, b) < 1e-5


def test_splash_kernel_matches_xla_on_packed_rows():
    x = _packed_inputs()
    params = jax.jit(lambda r: ESM3(CFG).init(r, **x))(jax.random.PRNGKey(0))
    loss_xla, g_xla = _loss_and_grads("xla", params, x)
    loss_splash, g_splash = _loss_and_grads("splash-interpret", params, x)
    assert abs(float(loss_xla) - float(loss_splash)) < 1e-5 * abs(float(loss_xla))
    errors = jax.tree.map(lambda a, b: relative_error(a, b), g_splash, g_xla)
    assert max(jax.tree.leaves(errors)) < 1e-5


def _sharded_worker() -> None:
    """In an 8-device process: the splash kernel under shard_map on a (2, 2, 2) mesh, batch over
    data x fsdp and heads over tensor, against the unsharded XLA attention."""
    from esm3_jax.train import sharding as shd
    from esm3_jax.train.config import MeshConfig

    assert jax.device_count() == 8
    x = _packed_inputs()
    params = jax.jit(lambda r: ESM3(CFG).init(r, **x))(jax.random.PRNGKey(0))
    want_loss, want_grads = _loss_and_grads("xla", params, x)
    mesh_cfg = MeshConfig(2, 2, 2)
    mesh = shd.make_mesh(mesh_cfg, jax.devices())
    with shd.sharding_context(mesh, mesh_cfg.rules.as_flax_rules()):
        loss, grads = _loss_and_grads("splash-interpret", params, x)
    err = max(jax.tree.leaves(jax.tree.map(lambda a, b: relative_error(a, b), grads, want_grads)))
    print(json.dumps({"loss": float(loss), "want": float(want_loss), "grad_error": err}))


def test_splash_kernel_sharded_over_batch_and_heads():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO))
    code = "from tests.test_attention import _sharded_worker; _sharded_worker()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["loss"] - r["want"]) < 1e-5 * abs(r["want"])
    assert r["grad_error"] < 1e-5


def test_splash_train_step_compiles_for_a_tpu_slice():
    """The real train step with the splash kernel, lowered and compiled by libtpu for v5p-8 from
    this CPU machine: the kernel is in the program (Mosaic custom calls), sharded over a
    (data 2, tensor 2) mesh, and the compile succeeds."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install libtpu)")
    code = (
        "from esm3_jax.train.config import load_config\n"
        "from esm3_jax.model.esm3 import ESM3\n"
        "from esm3_jax.train import aot, optim, sharding as shd, state as st, step as stp\n"
        "cfg = load_config('configs/tiny.yaml', ['model.attention=splash', 'model.n_layers=2', 'data.batch_size=8',"
        " 'data.max_length=128', 'mesh.data=2', 'mesh.tensor=2'])\n"
        "_, devices = aot.topology_devices('v5p-8')\n"
        "mesh = shd.make_mesh(cfg.mesh, devices); rules = cfg.mesh.rules.as_flax_rules()\n"
        "model, tx = ESM3(cfg.model), optim.make_optimizer(cfg.train)\n"
        "abstract, sh = st.state_shardings(model, tx, mesh, rules)\n"
        "batch = aot.abstract_batch(cfg, mesh, rules)\n"
        "step = stp.jit_train_step(stp.make_train_step(model, tx, loss_weights=cfg.train.loss_weights.as_dict(),"
        " grad_accum_steps=1, mesh=mesh, rules=rules), sh, {k: v.sharding for k, v in batch.items()}, mesh, rules)\n"
        "lowered = step.lower(st.abstract_with_shardings(abstract, sh), batch)\n"
        "print('kernels', lowered.as_text().count('tpu_custom_call'))\n"
        "lowered.compile()\n"
        "print('compiled')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    # Forward, dq and dkv kernels for each of the two layers.
    assert "kernels 6" in lines and lines[-1] == "compiled", out.stdout
