"""Checkpoint save/restore, fallback past broken steps, and `esm3-jax checkpoint-info`.

A small pytree stands in for the train state here (the full model run is tests/test_train.py);
the data iterator is a real Grain iterator whose position must come back with the state.
"""

import shutil
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax.cli import main as cli_main
from esm3_jax.train import checkpoint as ckpt_lib


def _state(seed: int) -> dict:
    k = jax.random.PRNGKey(seed)
    return {
        "step": jnp.array(seed, jnp.int32),
        "params": {"dense": {"kernel": jax.random.normal(k, (16, 8)), "bias": jnp.zeros(8)},
                   "embed": jax.random.normal(k, (32, 8)).astype(jnp.bfloat16)},
        "opt_state": {"mu": jnp.full((16, 8), 0.5 * seed)},
        "rng": jax.random.PRNGKey(seed + 100),
        "nonfinite_in_a_row": jnp.array(0, jnp.int32),
        "nonfinite_total": jnp.array(seed % 2, jnp.int32),
    }


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


CONFIG = {"model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "compute_dtype": "float32"},
          "train": {"steps": 3, "learning_rate": 0.001, "grad_accum_steps": 1, "output_dir": "x"},
          "data": {"batch_size": 4, "max_length": 8}, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}}


@pytest.fixture
def saved(tmp_path):
    """Steps 1..3 saved asynchronously with keep=2; returns (dir, states by step, next batch after step)."""
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=2, async_save=True)
    it = _iterator()
    states, next_batch = {}, {}
    for step in (1, 2, 3):
        next(it)
        states[step] = _state(step)
        ckpt.save(step, states[step], it, CONFIG)
        probe = _iterator()
        probe.set_state(it.get_state())
        next_batch[step] = next(probe)
    ckpt.close()
    return tmp_path / "checkpoints", states, next_batch


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) and x.dtype == y.dtype
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_restore_latest_state_and_iterator_exactly(saved):
    directory, states, next_batch = saved
    ckpt = ckpt_lib.Checkpointer(directory, keep=2)
    assert ckpt.all_steps() == [2, 3]
    it = _iterator()
    step, state = ckpt.restore_latest(_abstract(states[3]), it)
    assert step == 3 and _same(state, states[3])
    np.testing.assert_array_equal(next(it), next_batch[3])
    assert ckpt.saved_config() == CONFIG
    ckpt.close()


def _flip_a_byte_in_the_array_data(folder):
    """Silent bit rot: one byte changed in the middle of each OCDBT data file (under d/)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for target in files:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x40
        target.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "lost_index", "lost_iterator"])
def test_corrupted_latest_falls_back_to_previous_with_a_warning(saved, damage):
    directory, states, next_batch = saved
    state_dir = directory / "3" / "state"
    if damage == "flip":
        _flip_a_byte_in_the_array_data(state_dir)
    elif damage == "truncate":
        for p in state_dir.rglob("*"):
            if p.is_file() and p.parent.name == "d":
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    elif damage == "lost_index":  # the OCDBT manifests that locate every array's bytes
        for p in state_dir.rglob("manifest.ocdbt"):
            p.unlink()
    else:  # the data iterator's position is part of the step: without it the step is unusable
        shutil.rmtree(directory / "3" / "data_iter")
    ckpt = ckpt_lib.Checkpointer(directory, keep=2)
    it = _iterator()
    with pytest.warns(RuntimeWarning, match=r"checkpoints/3 is incomplete or corrupted"):
        step, state = ckpt.restore_latest(_abstract(states[2]), it)
    assert step == 2 and _same(state, states[2])
    np.testing.assert_array_equal(next(it), next_batch[2])
    # The run goes on from step 2 and saves step 3 again: the broken step is replaced (Orbax
    # refuses to save over an existing step), and the new one reads back.
    ckpt.save(3, states[3], it, CONFIG)
    ckpt.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step, state = ckpt.restore_latest(_abstract(states[3]), _iterator())
    assert step == 3 and _same(state, states[3]) and ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_interrupted_save_is_not_a_step(saved):
    directory, states, _ = saved
    # What a save killed mid-way leaves: Orbax's temporary folder, never renamed to "4".
    partial = directory / "4.orbax-checkpoint-tmp-1764000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    ckpt = ckpt_lib.Checkpointer(directory, keep=2)
    assert ckpt.all_steps() == [2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the latest complete step reads back without a warning
        step, _ = ckpt.restore_latest(_abstract(states[3]), _iterator())
    assert step == 3
    ckpt.close()


def test_no_checkpoint_means_fresh_start(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path / "empty")
    assert ckpt.restore_latest(_abstract(_state(0)), _iterator()) is None
    ckpt.close()


def test_checksum_sees_every_bit():
    s = _state(5)
    base = ckpt_lib.state_checksum(s)
    assert base == ckpt_lib.state_checksum(jax.tree.map(jnp.copy, s))
    flipped = jax.tree.map(lambda x: x, s)
    kernel = np.asarray(s["params"]["dense"]["kernel"]).copy()
    kernel.view(np.uint32)[3, 2] ^= 1  # the lowest mantissa bit of one weight
    flipped["params"]["dense"]["kernel"] = jnp.asarray(kernel)
    assert ckpt_lib.state_checksum(flipped) != base
    swapped = dict(s, opt_state={"mu": s["opt_state"]["mu"].at[0, 0].set(1.0)})
    assert ckpt_lib.state_checksum(swapped) != base


def test_checkpoint_info_cli(saved, capsys):
    directory, states, _ = saved
    assert cli_main(["checkpoint-info", str(directory.parent)]) == 0
    out = capsys.readouterr().out
    assert "step: 3 (available: 2, 3)" in out
    assert "model: d_model=16 n_heads=2 n_layers=1" in out
    expected = ckpt_lib.params_fingerprint(jax.device_get(states[3]["params"]))
    assert f"fingerprint: {expected}" in out.splitlines()
    assert cli_main(["checkpoint-info", str(directory), "--step", "2"]) == 0
    assert "step: 2" in capsys.readouterr().out
    assert cli_main(["checkpoint-info", str(directory), "--step", "7"]) == 2
    assert "no step 7; available: [2, 3]" in capsys.readouterr().err
    assert cli_main(["checkpoint-info", str(directory / "nope")]) == 2
