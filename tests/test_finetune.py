"""Fine-tuning: `train.init_from` (converted reference weights or another run) and `train.trainable`.

A reference PyTorch ESM3 with random weights at the tiny shape is written as a state dict and
imported by `esm3-jax convert`. A run started from it must see exactly those parameters (its first
step's per-track losses equal the reference model's cross-entropy on the same batch), frozen
parameters must stay bit-identical with no optimizer state, a model that does not fit and a pattern
that selects nothing must fail before anything is compiled, a restart must resume rather than
re-initialise, and parameters saved on 8 devices must load on 1 and vice versa.
Batches are synthetic (every track filled, ~30% masked); ~1-2 min on 2 cores, mostly XLA compiles.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from esm3_jax.batch import synthetic_train_batch
from esm3_jax.cli import main as cli_main
from esm3_jax.compat.params_io import load_params, read_checkpoint
from esm3_jax.train.config import load_config
from esm3_jax.train.loop import train
from esm3_jax.train.optim import param_path
from esm3_jax.train.setup import setup_training
from tests.paths import CONFIGS, JAX_CACHE, REPO

D, H, VH, NL = 64, 4, 8, 2  # configs/tiny.yaml's and configs/finetune_tiny.yaml's model
ROWS, LENGTH = 4, 32
TRAINABLE = [".*_head/", "^trunk/block_0/"]  # finetune_tiny.yaml's: heads + the last (plain) block


class SyntheticBatches(grain.DatasetIterator):
    """Batch k is synthetic_train_batch(seed=k): deterministic, checkpointable like the pipeline."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.k = start

    def __next__(self):
        self.k += 1
        return synthetic_train_batch(ROWS, LENGTH, seed=self.k - 1)

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = state["k"]


def _overrides(out, *extra):
    return [f"train.output_dir={out}", "data.max_length=%d" % LENGTH, "data.batch_size=%d" % ROWS,
            "train.eval_every=0", "train.progress_bar=false", "train.async_checkpointing=false", *extra]


def _host_paths(tree) -> dict[str, np.ndarray]:
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(jax_cache):
    """Every test here shares the persistent compilation cache (conftest.py)."""
    yield


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(reference torch model, the params checkpoint `esm3-jax convert` made of its weights)."""
    from esm3_jax.compat.convert import write_torch_state_dict
    from tests.reference import build_reference_esm3

    model, state = build_reference_esm3(D, H, VH, NL, seed=0)
    work = tmp_path_factory.mktemp("converted")
    write_torch_state_dict(state, work / "esm3_tiny.pth")
    assert cli_main(["convert", "--torch-state-dict", str(work / "esm3_tiny.pth"), "--n-heads", str(H),
                     "--out", str(work / "esm3_tiny")]) == 0
    return model, work / "esm3_tiny"


def test_init_from_converted_weights_starts_from_exactly_those_weights(converted, tmp_path):
    _, ckpt = converted
    cfg = load_config(CONFIGS / "tiny.yaml", _overrides(tmp_path / "run", f"train.init_from={ckpt}"))
    state = setup_training(cfg, jax.devices()).initial_state()
    want = _host_paths(load_params(ckpt)[2])
    got = _host_paths(state.params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))  # fresh moments


def _tb_losses(logdir: Path, step: int) -> dict[str, float]:
    """The `train/<track>/loss` scalars of one step (tensorboardX files: length, crc, Event, crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            if event.step == step:
                out.update({v.tag: v.simple_value for v in event.summary.value if v.tag.endswith("loss")})
    return out


@pytest.fixture(scope="module")
def frozen_run(converted, tmp_path_factory):
    """finetune_tiny.yaml from the converted weights: 3 steps, then a restart to step 5."""
    _, ckpt = converted
    out = tmp_path_factory.mktemp("finetune") / "run"
    extra = ["train.warmup_steps=1", "train.learning_rate=0.003", "train.checkpoint_every=3"]
    cfg = load_config(CONFIGS / "finetune_tiny.yaml",
                      _overrides(out, f"train.init_from={ckpt}", "train.steps=3", *extra))
    first = train(cfg, make_train_iter=SyntheticBatches)
    after3 = read_checkpoint(out / "checkpoints")
    # The restart names weights that do not exist: were init_from read, it would fail.
    cfg5 = load_config(CONFIGS / "finetune_tiny.yaml",
                       _overrides(out, f"train.init_from={out}/nowhere", "train.steps=5", *extra))
    second = train(cfg5, make_train_iter=SyntheticBatches)
    return dict(ckpt=ckpt, out=out, first=first, after3=after3, second=second, after5=read_checkpoint(out / "checkpoints"))


def test_first_step_losses_are_the_reference_models_cross_entropy(converted, frozen_run):
    """Step 1's losses are taken before its update, on the converted weights: the reference
    PyTorch model's logits on batch 0, through the same per-track cross-entropy, agree."""
    from esm3_jax.batch import INPUT_KEYS, TRACKS
    from esm3_jax.compat.reference import reference_forward
    from esm3_jax.train.loss import masked_lm_loss

    model, _ = converted
    batch = synthetic_train_batch(ROWS, LENGTH, seed=0)
    ref_out = reference_forward(model, {k: batch[k] for k in INPUT_KEYS})
    _, ref = masked_lm_loss({k: jax.numpy.asarray(v) for k, v in ref_out.items()}, batch, {t: 1.0 for t in TRACKS})
    ours = _tb_losses(frozen_run["out"] / "tensorboard", step=1)
    for track in TRACKS:
        np.testing.assert_allclose(ours[f"train/{track}/loss"], float(ref[f"{track}/loss"]), rtol=1e-5, err_msg=track)
    np.testing.assert_allclose(ours["train/loss"], float(ref["loss"]), rtol=1e-5)


def _unscanned(params: dict) -> dict[str, np.ndarray]:
    """Converted (scanned) parameters in finetune_tiny.yaml's unrolled layout."""
    from esm3_jax.model.config import model_config_from_dict
    from esm3_jax.train.finetune import convert_layer_layout
    import dataclasses

    scanned = model_config_from_dict(dict(d_model=D, n_heads=H, n_layers=NL, v_heads=VH))
    return _host_paths(convert_layer_layout(params, scanned, dataclasses.replace(scanned, scan_layers=False)))


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(frozen_run):
    import re

    initial = _unscanned(load_params(frozen_run["ckpt"])[2])
    final = _host_paths(frozen_run["after3"]["state"]["params"])
    assert final.keys() == initial.keys()
    trainable = {k for k in final if any(re.search(p, k) for p in TRAINABLE)}
    assert trainable and len(trainable) < len(final)
    for k in final:
        if k in trainable:
            assert not np.array_equal(final[k], initial[k]), f"{k} is trainable but did not move"
        else:
            np.testing.assert_array_equal(final[k], initial[k], err_msg=f"{k} is frozen but moved")
    # Adam's two moments for the trainable parameters, and nothing for the frozen ones (the rest
    # of the optimizer state is scalars: step counters).
    opt = [np.asarray(x) for x in jax.tree.leaves(frozen_run["after3"]["state"]["opt_state"])]
    n_trainable = sum(final[k].size for k in trainable)
    moments = [x for x in opt if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_trainable
    assert len(moments) == 2 * len(trainable)
    assert sum(x.size for x in opt if x.ndim == 0) <= 4
    assert frozen_run["first"].step == 3


def test_restart_resumes_its_own_checkpoint_not_init_from(frozen_run):
    assert frozen_run["second"].step == 5 and frozen_run["after5"]["step"] == 5
    assert int(np.asarray(frozen_run["after5"]["state"]["step"])) == 5  # counted on from 3, not from 0
    after3, after5 = _host_paths(frozen_run["after3"]["state"]["params"]), _host_paths(frozen_run["after5"]["state"]["params"])
    initial = _unscanned(load_params(frozen_run["ckpt"])[2])
    for k in after5:
        if any(k.find(s) >= 0 for s in ("_head/", "trunk/block_0/")):
            assert not np.array_equal(after5[k], after3[k]), k
        else:
            np.testing.assert_array_equal(after5[k], initial[k], err_msg=k)


def test_a_model_that_does_not_fit_and_a_pattern_that_matches_nothing_exit_2(converted, tmp_path, capsys):
    _, ckpt = converted
    base = ["train", "--config", str(CONFIGS / "finetune_tiny.yaml"), f"train.output_dir={tmp_path / 'run'}",
            f"train.init_from={ckpt}", "train.progress_bar=false"]
    assert cli_main([*base, "model.d_model=128", "model.n_heads=8"]) == 2
    assert "model.d_model: checkpoint has 64, config has 128" in capsys.readouterr().err
    assert cli_main([*base, "model.scale_residue=false"]) == 2
    assert "model.scale_residue: checkpoint has True, config has False" in capsys.readouterr().err
    assert cli_main([*base, "train.trainable=['.*_head/', 'trunk/blokc_0/']"]) == 2
    err = capsys.readouterr().err
    assert "train.trainable: pattern 'trunk/blokc_0/' matches no parameter" in err
    assert cli_main([*base, "train.trainable=['(']"]) == 2
    assert "train.trainable: bad regular expression '('" in capsys.readouterr().err
    assert cli_main([*base[:-2], f"train.init_from={tmp_path / 'nothing'}"]) == 2
    assert "not an esm3-jax checkpoint" in capsys.readouterr().err


def test_layer_layout_conversion_round_trips():
    """scanned -> unrolled -> scanned gives back every array (init_from converts either way)."""
    import dataclasses

    from esm3_jax.model.config import model_config_from_dict
    from esm3_jax.train.finetune import convert_layer_layout

    scanned = model_config_from_dict(dict(d_model=D, n_heads=H, n_layers=4, v_heads=VH))
    unrolled = dataclasses.replace(scanned, scan_layers=False)
    rng = np.random.default_rng(0)
    block = {"attn": {"qkv": rng.normal(size=(3, D, 3, H, D // H))}, "ffn": {"up": rng.normal(size=(3, D, 2, 256))}}
    params = {"trunk": {"geom_block_0": {"x": np.ones(2)}, "blocks": {"block": block}}, "final_norm": {"scale": np.ones(D)}}
    split = convert_layer_layout(params, scanned, unrolled)
    assert sorted(split["trunk"]) == ["block_0", "block_1", "block_2", "geom_block_0"]
    np.testing.assert_array_equal(split["trunk"]["block_2"]["ffn"]["up"], block["ffn"]["up"][2])
    back = convert_layer_layout(split, unrolled, scanned)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


# --- another device count: a subprocess with 8 CPU devices ---------------------------------------


def _worker(one_device_run: str, out: str) -> None:
    """On 8 devices: starts a run (fsdp=8) from the 1-device run's weights, and saves that state as
    the 8-device run's own checkpoint, written shard by shard; prints one JSON line."""
    from esm3_jax.config import to_dict
    from esm3_jax.train.checkpoint import Checkpointer, params_fingerprint

    assert jax.device_count() == 8
    cfg = load_config(CONFIGS / "finetune_tiny.yaml", _overrides(out, "mesh.data=1", "mesh.fsdp=8",
                                                                 f"train.init_from={one_device_run}"))
    state = setup_training(cfg, jax.devices()).initial_state()
    up = state.params["trunk"]["block_0"]["ffn"]["up"]
    ckpt = Checkpointer(cfg.train.checkpoint_dir, async_save=False)
    ckpt.save(1, state.as_dict(), None, to_dict(cfg))
    ckpt.close()
    # 1 device -> 8 for the verbs that read parameters: forward and generate on the 1-device run,
    # here with 8 devices visible; the parent reruns both on one device and compares.
    from esm3_jax.cli import main as cli

    inputs = _portability_inputs()
    np.savez(Path(out) / "in.npz", **inputs)
    for verb, extra in (("forward", []), ("generate", ["--track", "sequence", "--num-steps", "3", "--temperature", "1"])):
        assert cli([verb, "--checkpoint", one_device_run, "--inputs", str(Path(out) / "in.npz"),
                    "--out", str(Path(out) / f"{verb}8.npz"), *extra]) == 0
    print("RESULT " + json.dumps({
        "loaded": params_fingerprint(jax.tree.map(np.asarray, state.params)),
        "loaded_spec": str(up.sharding.spec), "loaded_shards": len({s.device for s in up.addressable_shards}),
    }), flush=True)


def _portability_inputs() -> dict[str, np.ndarray]:
    """Two proteins' sequences with a few positions masked (for forward and generate alike)."""
    from esm3_jax.batch import random_inputs
    from esm3_jax import tokens as T

    seq = random_inputs(2, 16)["sequence_tokens"]
    seq[:, 3:9] = T.SEQUENCE_MASK
    return {"sequence_tokens": seq}


def test_weights_move_between_device_counts(frozen_run, tmp_path):
    from esm3_jax.train.checkpoint import params_fingerprint

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               # This checkout's esm3_jax and tests, whatever else the environment has installed.
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(frozen_run["out"]), str(tmp_path / "run8")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(lines[0][len("RESULT "):])
    # 1 device -> 8: the 1-device run's latest parameters, each split 8 ways along "embed".
    assert r["loaded"] == params_fingerprint(frozen_run["after5"]["state"]["params"])
    assert r["loaded_spec"] == "P('fsdp', None, 'tensor')" and r["loaded_shards"] == 8
    # forward and generate read the 1-device run on 8 devices and give what they give on one.
    for verb, extra in (("forward", []), ("generate", ["--track", "sequence", "--num-steps", "3", "--temperature", "1"])):
        assert cli_main([verb, "--checkpoint", str(frozen_run["out"]), "--inputs", str(tmp_path / "run8" / "in.npz"),
                         "--out", str(tmp_path / f"{verb}1.npz"), *extra]) == 0
        on8, on1 = np.load(tmp_path / "run8" / f"{verb}8.npz"), np.load(tmp_path / f"{verb}1.npz")
        assert set(on8.files) == set(on1.files)
        for k in on1.files:
            np.testing.assert_allclose(on8[k], on1[k], rtol=1e-5, atol=1e-5, err_msg=f"{verb} {k}")
    assert not np.any(np.load(tmp_path / "generate1.npz")["sequence_tokens"] == 32)
    # 8 devices -> 1: the 8-device run's parameters exactly, on this process's one device ...
    cfg = load_config(CONFIGS / "finetune_tiny.yaml", _overrides(tmp_path / "unused", f"train.init_from={tmp_path / 'run8'}"))
    loaded = setup_training(cfg, jax.devices()[:1]).initial_state()
    assert params_fingerprint(jax.tree.map(np.asarray, loaded.params)) == r["loaded"]
    assert len(jax.tree.leaves(loaded.params)[0].sharding.device_set) == 1
    # ... and to host numpy with no shardings at all (what `forward` and `convert --export` read).
    kind, _, host = load_params(tmp_path / "run8")
    assert kind == "esm3" and params_fingerprint(host) == r["loaded"]
    # Every verb that reads parameters takes the 8-device run on this one device.
    from esm3_jax.batch import random_inputs

    np.savez(tmp_path / "in.npz", **{k: v for k, v in random_inputs(2, 16).items() if k == "sequence_tokens"})
    assert cli_main(["checkpoint-info", str(tmp_path / "run8")]) == 0
    assert cli_main(["convert", "--export", str(tmp_path / "run8"), "--out", str(tmp_path / "run8.pth")]) == 0
    assert cli_main(["forward", "--checkpoint", str(tmp_path / "run8"), "--inputs", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "out.npz")]) == 0
    assert np.load(tmp_path / "out.npz")["sequence_logits"].shape[:2] == (2, 16)
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "run8"), "--inputs", str(tmp_path / "run8" / "in.npz"),
                     "--track", "sequence", "--num-steps", "2", "--out", str(tmp_path / "gen.npz")]) == 0
    assert not np.any(np.load(tmp_path / "gen.npz")["sequence_tokens"] == 32)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
