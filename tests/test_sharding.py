"""Sharded training on 8 simulated CPU devices (a subprocess: the device count is fixed at start-up).

The same tiny run on meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2) and (1,1,1) gives the
same losses step for step (up to fp32 reduction order); gradient accumulation over 2 microbatches
gives the same losses as the full batch; and a run stopped after step 2 on one mesh resumes by
itself on another mesh and ends where the uninterrupted run ends. Batches are real proteins from
demo_data/ through the Grain pipeline. Slow-ish: ~8 XLA compiles, 1-2 min on 2 cores.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# This file also runs as a script in its multi-device subprocess, where `tests` is not a
# package on the path: it finds the repository itself rather than through tests/paths.py.
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_data"

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 1)]
STEPS = 3
# XLA's persistent compilation cache (keyed by program and jax version): reruns skip the compiles.
JAX_CACHE = str(Path(tempfile.gettempdir()) / "esm3-jax-test-compilation-cache")


def _worker(records: str, out: str) -> None:
    """Runs in the 8-device subprocess; prints one JSON line of results."""
    import jax
    import numpy as np

    from esm3_jax.train.config import load_config
    from esm3_jax.data import pipeline
    from esm3_jax.model.esm3 import ESM3
    from esm3_jax.train import optim, sharding as shd, state as st, step as stp
    from esm3_jax.train.checkpoint import read_checkpoint
    from esm3_jax.train.config import MeshConfig
    from esm3_jax.train.loop import train

    assert jax.device_count() == 8
    overrides = [f"data.datasets=[{{path: {records}}}]", "data.max_length=32", "data.batch_size=8",
                 f"train.steps={STEPS}", "train.warmup_steps=1", "train.learning_rate=0.003",
                 "train.progress_bar=false", "train.eval_every=0"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    model, tx = ESM3(cfg.model), optim.make_optimizer(cfg.train)
    it = pipeline.make_iterator(cfg.data)
    batches = [next(it) for _ in range(STEPS)]
    results = {}
    base_state = None
    for shape, accum in [(m, 1) for m in MESHES] + [((2, 2, 2), 2)]:
        mesh_cfg = MeshConfig(*shape)
        mesh = shd.make_mesh(mesh_cfg, jax.devices()[: int(np.prod(shape))])
        rules = mesh_cfg.rules.as_flax_rules()
        _, sh = st.state_shardings(model, tx, mesh, rules)
        if base_state is None:  # one init, then placed on each mesh: the same starting bits
            base_state = jax.device_get(st.create_state(model, tx, cfg.train.seed, sh))
        state = jax.device_put(base_state, sh)
        bsh = shd.batch_shardings(batches[0], mesh, rules)
        step = stp.jit_train_step(stp.make_train_step(model, tx, loss_weights=cfg.train.loss_weights.as_dict(),
                                                      grad_accum_steps=accum, mesh=mesh, rules=rules),
                                  sh, bsh, mesh, rules)
        losses = []
        for b in batches:
            state, m = step(state, shd.global_batch(b, bsh, cfg.data.batch_size))
            losses.append(float(m["loss"]))
        specs = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
        results[f"{shape}x{accum}"] = {"losses": losses, "specs": specs}

    # Resume onto a different mesh, through the training loop: run to the end on (8,1,1), then
    # keep only the step-2 checkpoint and restart on (2,2,2).
    def run(mesh_overrides):
        c = load_config(REPO / "configs" / "tiny.yaml", overrides + [
            f"train.output_dir={out}", "train.checkpoint_every=2", "train.keep_checkpoints=5", *mesh_overrides])
        return train(c)

    full = run(["mesh.data=8"])
    final_a = read_checkpoint(f"{out}/checkpoints", STEPS)["state"]["params"]
    shutil.rmtree(f"{out}/checkpoints/{STEPS}")
    resumed = run(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    final_b = read_checkpoint(f"{out}/checkpoints", STEPS)["state"]["params"]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)))
    results["resume"] = {"loss_full": full.metrics["loss"], "loss_resumed": resumed.metrics["loss"],
                         "max_param_diff": diff}
    print("RESULT " + json.dumps(results), flush=True)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    if not DEMO.is_dir():
        pytest.skip(f"{DEMO} is missing")
    from esm3_jax.cli import main as cli_main

    work = tmp_path_factory.mktemp("sharding")
    src = work / "chains.jsonl"
    with gzip.open(DEMO / "pdb_chains_train.jsonl.gz", "rt") as f:
        src.write_text("".join(line for _, line in zip(range(64), f)))
    assert cli_main(["preprocess", str(src), "-o", str(work / "records"), "-j", "1", "--no-progress"]) == 0
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, __file__, str(work / "records"), str(work / "run")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def test_meshes_give_the_same_losses(worker_results):
    reference = worker_results["(1, 1, 1)x1"]["losses"]
    assert np.all(np.isfinite(reference)) and reference[-1] < reference[0]
    for shape in MESHES:
        np.testing.assert_allclose(worker_results[f"{shape}x1"]["losses"], reference, rtol=2e-5, err_msg=str(shape))


def test_gradient_accumulation_matches_the_full_batch(worker_results):
    np.testing.assert_allclose(worker_results["(2, 2, 2)x2"]["losses"], worker_results["(2, 2, 2)x1"]["losses"],
                               rtol=2e-5)


def test_parameters_are_sharded_by_the_logical_rules(worker_results):
    specs = worker_results["(2, 2, 2)x1"]["specs"]
    # FSDP over "embed", tensor over "mlp"/"heads"/"vocab"; scanned layers keep their leading axis whole.
    assert specs["['trunk']['blocks']['block']['ffn']['up']"] == "P(None, 'fsdp', None, 'tensor')"
    assert specs["['trunk']['blocks']['block']['ffn']['down']"] == "P(None, 'tensor', 'fsdp')"
    assert "'fsdp'" in specs["['encoder']['structure_embed']"]
    assert all("'data'" not in s for s in specs.values())  # parameters are never split over pure data parallelism


def test_resume_onto_a_different_mesh(worker_results):
    r = worker_results["resume"]
    np.testing.assert_allclose(r["loss_resumed"], r["loss_full"], rtol=2e-5)
    assert r["max_param_diff"] < 1e-5


# --- the pieces, without devices ----------------------------------------------------------------


def test_mesh_shape_resolution():
    from esm3_jax.train.config import MeshConfig

    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=1, fsdp=-1).shape(64) == (1, 64, 1)
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        MeshConfig(data=3, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).validate()


def test_specs_replicate_what_they_cannot_split():
    import jax
    from jax.sharding import PartitionSpec as P

    from esm3_jax.train.sharding import _fit_spec

    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert _fit_spec(P("fsdp", "tensor"), (64, 4096), mesh, "w") == P("fsdp", "tensor")
    assert _fit_spec(P("fsdp", "tensor"), (64, 11), mesh, "ss8 head") == P("fsdp")  # 11 logits on tensor=2
    assert _fit_spec(P("tensor", "tensor"), (64, 64), mesh, "head") == P("tensor")  # an axis used once
    assert _fit_spec(P(("data", "fsdp")), (8, 32), mesh, "batch") == P(("data", "fsdp"))


def test_slurm_environment_gives_the_process_layout():
    from esm3_jax.runtime import distributed

    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "gpu[012-015,020]"}
    assert distributed.slurm_settings(env) == ("gpu012:12355", 4, 3)
    assert distributed.slurm_settings({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert distributed.slurm_settings({}) is None
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("host:1234", None, None)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
