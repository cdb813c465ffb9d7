"""The training run end to end on real proteins (demo_data/), on one CPU device.

One uninterrupted in-process run is the reference. A second run of the same config in a
subprocess is killed with SIGKILL after its first checkpoint, restarted, stopped with SIGTERM
(it must save and exit 0), restarted again, and must end with bit-identical parameters.
Slow-ish (~1-2 min on 2 cores, most of it XLA compiles; a persistent compilation cache shared by
the runs keeps the subprocesses short).
"""

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from esm3_jax.cli import main as cli_main
from esm3_jax.train.config import load_config
from esm3_jax.train import checkpoint as ckpt_lib
from esm3_jax.train.loop import TrainingDiverged, train
from tests.paths import DEMO, REPO

STEPS = 12


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A slice of the bundled demo data (sidechainnet chains + PDB files), preprocessed."""
    if not DEMO.is_dir():
        pytest.skip(f"{DEMO} is missing")
    work = tmp_path_factory.mktemp("records")
    src = work / "chains.jsonl"
    import gzip

    with gzip.open(DEMO / "pdb_chains_train.jsonl.gz", "rt") as f:
        src.write_text("".join(line for _, line in zip(range(120), f)))
    structures = sorted((DEMO / "structures").glob("*.pdb.gz"))[:3]
    out = {}
    for split, inputs in (("train", [str(src), *map(str, structures)]), ("valid", [str(DEMO / "pdb_chains_valid.jsonl.gz")])):
        assert cli_main(["preprocess", *inputs, "-o", str(work / split), "-j", "1", "--no-progress"]) == 0
        out[split] = work / split
    return out


def _overrides(records, output_dir) -> list[str]:
    return [
        f"train.output_dir={output_dir}", f"train.steps={STEPS}", "train.warmup_steps=2",
        "train.learning_rate=0.003", "train.checkpoint_every=4", "train.keep_checkpoints=2",
        "train.eval_every=6", "train.eval_batches=1", "train.progress_bar=false",
        f"data.datasets=[{{path: {records['train']}}}]", f"train.eval_datasets=[{{path: {records['valid']}}}]",
        "data.max_length=32", "data.batch_size=4",
    ]


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read tensorboardX event files (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.fixture(scope="module")
def reference_run(records, jax_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(records, out))
    return out, train(cfg)


def test_training_learns_logs_validates_and_checkpoints(reference_run):
    out, result = reference_run
    assert result.reason == "finished" and result.step == STEPS
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints")
    assert ckpt.all_steps() == [8, 12]  # every 4 steps, the last 2 kept
    ckpt.close()
    scalars = _tb_scalars(out / "tensorboard")
    losses = [v for _, v in sorted(scalars["train/loss"])]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    for tag in ("train/sequence/loss", "train/sequence/accuracy", "train/sequence/perplexity", "train/ss8/loss",
                "train/grad_norm", "train/learning_rate", "train/tokens_per_s", "eval/sequence/nll", "eval/ss8/nll"):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["eval/sequence/nll"]] == [6, 12]
    # Real chains with DSSP labels: sequence and SS8 validation NLL are measured, and below chance.
    assert 0 < result.eval_metrics["sequence/nll"] < np.log(33)
    assert 0 < result.eval_metrics["ss8/nll"] < np.log(8)
    # Tracks the split has no labels for are absent, never nan.
    assert result.eval_metrics and all(np.isfinite(v) for v in result.eval_metrics.values())


def test_validation_line_names_the_tracks_without_held_out_labels():
    from esm3_jax.train.evaluate import format_eval as _format_eval

    line = _format_eval({"sequence/nll": 2.5, "sequence/accuracy": 0.2, "ss8/nll": 1.25, "ss8/accuracy": 0.5})
    assert line.startswith("sequence=2.500 ss8=1.250 (no held-out labels: ")
    assert "function" in line and "nan" not in line and "sequence," not in line


def test_profile_option_writes_a_trace_of_the_chosen_steps(records, jax_cache, tmp_path):
    """`train.profile_steps=[2,3]` captures a jax.profiler trace. Run as its own process, as a
    user would: the profiler then shares no process with the other tests' libraries."""
    overrides = _overrides(records, tmp_path) + ["train.steps=4", "train.eval_every=0", "train.profile_steps=[2,3]"]
    proc = _start(overrides, jax_cache)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "profile of steps 2-3" in out
    assert list((tmp_path / "profile").rglob("*.xplane.pb")), "no profiler trace of steps 2-3"


class _PoisonFrom(grain.DatasetIterator):
    """From the `start`-th batch on, average_plddt is NaN: the loss is not finite."""

    def __init__(self, parent, start):
        super().__init__(parent)
        self._start, self._n = start, 0

    def __next__(self):
        batch = dict(next(self._parent))
        self._n += 1
        if self._n >= self._start:
            batch["average_plddt"] = np.full_like(batch["average_plddt"], np.nan)
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "n": self._n}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._n = state["n"]


def test_nonfinite_steps_are_skipped_then_stop_the_run(records, reference_run, jax_cache, tmp_path, monkeypatch):
    from esm3_jax.data import pipeline
    from esm3_jax.runtime import hardware

    # On a CPU (no datasheet peak) MFU divides by a measured matmul rate: the reference run in
    # this process measured it, so this second train() must not time matmuls again.
    assert "mfu" in reference_run[1].metrics
    measured = []
    rates = hardware.matmul_rates
    monkeypatch.setattr(hardware, "matmul_rates", lambda *a, **k: measured.append(a) or rates(*a, **k))
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(records, tmp_path) + [
        "train.checkpoint_every=2", "train.max_nonfinite_in_a_row=3", "train.eval_every=0"])
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(cfg, make_train_iter=lambda: _PoisonFrom(pipeline.make_iterator(cfg.data), start=3))
    assert measured == []
    # Steps 3, 4, 5 were skipped; the run stopped at 5 without saving it. Step 4's checkpoint holds
    # the parameters of step 2, untouched by the skipped updates, and counts the skips.
    info = {s: ckpt_lib.read_checkpoint(tmp_path / "checkpoints", s) for s in (2, 4)}
    assert info[4]["steps"] == [2, 4]
    assert int(info[4]["state"]["nonfinite_total"]) == 2
    assert ckpt_lib.params_fingerprint(info[4]["state"]["params"]) == ckpt_lib.params_fingerprint(
        info[2]["state"]["params"])
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(info[4]["state"]["params"]))
    # Adam's step counter stopped at the 2 real updates; the learning-rate schedule's went on to 4.
    counts = [int(np.asarray(x)) for path, x in jax.tree_util.tree_flatten_with_path(info[4]["state"]["opt_state"])[0]
              if "count" in jax.tree_util.keystr(path)]
    assert sorted(counts) == [2, 4], counts


def _start(overrides, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "esm3_jax.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigkill_then_sigterm_then_resume_is_bitwise_exact(records, reference_run, jax_cache, tmp_path):
    ref_out, _ = reference_run
    overrides = _overrides(records, tmp_path) + ["train.eval_every=0"]
    ckdir = tmp_path / "checkpoints"

    # 1. SIGKILL as soon as the first checkpoint (step 4) is complete: mid-run, maybe mid-save.
    proc = _start(overrides, jax_cache)
    _wait_for(lambda: (ckdir / "4" / "commit_success.txt").exists() or (ckdir / "4" / "_CHECKPOINT_METADATA").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 2. Restart: it resumes by itself; SIGTERM (preemption) during start-up: it finishes one
    #    step, saves it and exits cleanly.
    proc = _start(overrides, jax_cache)
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, "".join(lines)[-3000:]
        lines.append(line)
        if "resumed from step" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    resumed_from = int(log.split("resumed from step ")[1].split()[0])
    assert resumed_from >= 4
    assert f"SIGTERM: saved step {resumed_from + 1}" in log, log[-3000:]

    # 3. Restart again and run to the end: the parameters equal the uninterrupted run's, bit for bit.
    proc = _start(overrides, jax_cache)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from step {resumed_from + 1}" in log
    ours = subprocess.run([sys.executable, "-m", "esm3_jax.cli", "checkpoint-info", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert ours.returncode == 0, ours.stderr
    fingerprint = [l for l in ours.stdout.splitlines() if l.startswith("fingerprint: ")]
    assert len(fingerprint) == 1 and f"step: {STEPS}" in ours.stdout
    reference = ckpt_lib.read_checkpoint(ref_out / "checkpoints")
    assert fingerprint[0] == f"fingerprint: {ckpt_lib.params_fingerprint(reference['state']['params'])}"


def test_bad_config_fails_before_anything_expensive(capsys):
    assert cli_main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "train.stepz=3"]) == 2
    assert "unknown key 'stepz'; did you mean 'steps'?" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "train.warmup_steps=5000"]) == 2
    assert "warmup_steps=5000 must be smaller than train.steps" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "mesh.rules.mlp=[tensr]"]) == 2
    assert "unknown mesh axis 'tensr'" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "train.cpu_matmul=mkl"]) == 2
    assert "train.cpu_matmul must be one of eigen, ynn, got 'mkl'" in capsys.readouterr().err
