"""A real two-process run: two `esm3-jax train` processes on localhost, 4 CPU devices each, joined
by jax.distributed (gloo collectives) into one mesh of 8; each reads its own slice of the data.

Its losses equal those of one process with 8 devices fed the same two slices; the two processes
write each checkpoint together and a restarted pair resumes from it. Slow (~2-4 min on 2 cores:
three 8-device compiles).
"""

import gzip
import os
import shutil
import socket
import struct
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

STEPS = 4


def _overrides(records, out):
    return [f"data.datasets=[{{path: {records}}}]", "data.max_length=32", "data.batch_size=8",
            f"train.steps={STEPS}", "train.warmup_steps=1", "train.learning_rate=0.003", "train.eval_every=0",
            "train.progress_bar=false", "train.checkpoint_every=2", "train.keep_checkpoints=5",
            f"train.output_dir={out}", "mesh.data=8"]


def _reference_worker(records: str, out: str) -> None:
    """One process, 8 devices, fed host 0's rows then host 1's rows: the global batch of the pair."""
    import grain
    import jax

    from esm3_jax.train.config import load_config
    from esm3_jax.data import pipeline
    from esm3_jax.train.loop import train

    class TwoHosts(grain.DatasetIterator):
        def __init__(self, cfg):
            super().__init__()
            self._its = [pipeline.make_iterator(cfg, process_index=i, process_count=2) for i in range(2)]

        def __next__(self):
            a, b = next(self._its[0]), next(self._its[1])
            return {k: np.concatenate([a[k], b[k]]) for k in a}

        def get_state(self):
            return {"hosts": [it.get_state() for it in self._its]}

        def set_state(self, state):
            for it, s in zip(self._its, state["hosts"]):
                it.set_state(s)

    assert jax.device_count() == 8 and jax.process_count() == 1
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(records, out))
    train(cfg, make_train_iter=lambda: TwoHosts(cfg.data))


def _tb_losses(logdir: Path) -> dict[int, float]:
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.tag == "train/loss":
                    out[event.step] = v.simple_value
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache, devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                PYTHONUNBUFFERED="1")


def _run_pair(records, out, cache) -> list[str]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "esm3_jax.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
             *_overrides(records, out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i)],
            cwd=REPO, env=_env(cache, 4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        log, _ = p.communicate(timeout=900)
        logs.append(log)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not DEMO.is_dir():
        pytest.skip(f"{DEMO} is missing")
    from esm3_jax.cli import main as cli_main

    work = tmp_path_factory.mktemp("multihost")
    cache = Path(tempfile.gettempdir()) / "esm3-jax-test-compilation-cache"
    src = work / "chains.jsonl"
    with gzip.open(DEMO / "pdb_chains_train.jsonl.gz", "rt") as f:
        src.write_text("".join(line for _, line in zip(range(64), f)))
    records = work / "records"
    assert cli_main(["preprocess", str(src), "-o", str(records), "-j", "1", "--no-progress"]) == 0

    ref = subprocess.run([sys.executable, __file__, str(records), str(work / "reference")], cwd=REPO,
                         env=_env(cache, 8), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-4000:]

    pair_logs = _run_pair(records, work / "pair", cache)
    first = _tb_losses(work / "pair" / "tensorboard")
    steps_written = sorted(int(p.name) for p in (work / "pair" / "checkpoints").iterdir() if p.name.isdigit())
    iterator_files = sorted(p.name for p in (work / "pair" / "checkpoints" / "2" / "data_iter").iterdir())
    # Restart the pair with the last step gone: both processes resume from step 2 together.
    shutil.rmtree(work / "pair" / "checkpoints" / str(STEPS))
    shutil.rmtree(work / "pair" / "tensorboard")
    resume_logs = _run_pair(records, work / "pair", cache)
    return dict(reference=_tb_losses(work / "reference" / "tensorboard"), first=first,
                resumed=_tb_losses(work / "pair" / "tensorboard"), pair_logs=pair_logs, resume_logs=resume_logs,
                steps_written=steps_written, iterator_files=iterator_files)


def test_two_processes_match_one_process_with_eight_devices(runs):
    assert "mesh data=8 x fsdp=1 x tensor=1 (8 devices)" in runs["pair_logs"][0]
    assert sorted(runs["first"]) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([runs["first"][s] for s in range(1, STEPS + 1)],
                               [runs["reference"][s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_checkpoint_written_together_and_resumed(runs):
    assert runs["steps_written"] == [2, 4]
    # One iterator-position file per process in the same step.
    assert len([f for f in runs["iterator_files"] if "process_" in f]) == 2, runs["iterator_files"]
    assert "resumed from step 2" in runs["resume_logs"][0]
    assert sorted(runs["resumed"]) == [3, 4]
    for s in (3, 4):
        np.testing.assert_allclose(runs["resumed"][s], runs["first"][s], rtol=1e-6)


if __name__ == "__main__":
    _reference_worker(sys.argv[1], sys.argv[2])
