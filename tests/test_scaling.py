"""`esm3-jax scaling`: the frontier and the power-law fit on synthetic points with known a, b, c;
then a micro ladder (two sizes, a few steps, demo records) end to end, rerun (a finished size is
skipped) and resumed from a checkpoint (the re-trained point's NLL equals the first run's)."""

import gzip
import json
import shutil

import numpy as np
import pytest
import yaml

from esm3_jax.cli import main as cli_main
from esm3_jax.eval import scaling
from tests.paths import DEMO


def test_frontier_is_the_lower_envelope():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (4.0, 3.0), (4.0, 3.5), (8.0, 3.2), (9.0, 2.0)]
    assert scaling.frontier(pts) == [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0), (9.0, 2.0)]


def test_fit_recovers_a_known_power_law():
    a, b, c = 40.0, 0.11, 1.9
    flops = np.geomspace(1e11, 1e15, 14)
    rng = np.random.default_rng(1)
    loss = scaling.power_law(flops, a, b, c) * (1 + 0.002 * rng.standard_normal(flops.size))
    # Points above the envelope (a worse model at the same compute) must not move the fit.
    pts = [(float(x), float(y)) for x, y in zip(flops, loss)] + [(float(x), float(y) + 0.3) for x, y in zip(flops, loss)]
    fit = scaling.fit_frontier(pts, n_boot=200, seed=0)
    assert len(fit["frontier"]) == flops.size
    assert fit["b"] == pytest.approx(b, rel=0.15)
    assert fit["c"] == pytest.approx(c, abs=0.05)
    assert fit["a"] * 1e13 ** -fit["b"] == pytest.approx(a * 1e13 ** -b, rel=0.05)  # the curve, where it is measured
    lo, hi = fit["b_95"]
    assert lo < b < hi and hi - lo < 0.1
    assert fit["r2"] > 0.99
    # Exact points: recovered closely.
    exact = scaling.fit_frontier([(float(x), float(y)) for x, y in zip(flops, scaling.power_law(flops, a, b, c))],
                                 n_boot=20)
    assert (exact["a"], exact["b"], exact["c"]) == pytest.approx((a, b, c), rel=1e-3)


def test_too_few_frontier_points_are_reported_not_fitted():
    fit = scaling.fit_frontier([(1e11, 3.0), (1e12, 2.9), (1e13, 2.8)], n_boot=10)
    assert "b" not in fit and "too few" in fit["note"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    if not DEMO.is_dir():
        pytest.skip(f"{DEMO} is missing")
    work = tmp_path_factory.mktemp("scaling")
    src = work / "chains.jsonl"
    with gzip.open(DEMO / "pdb_chains_train.jsonl.gz", "rt") as f:
        src.write_text("".join(line for _, line in zip(range(60), f)))
    for split, inp in (("train", src), ("valid", DEMO / "pdb_chains_valid.jsonl.gz")):
        assert cli_main(["preprocess", str(inp), "-o", str(work / split), "-j", "1", "--no-progress"]) == 0
    return work


def _ladder(records, out):
    raw = {
        "train_data": str(records / "train"), "valid_data": str(records / "valid"), "out": str(out),
        "base_config": "tiny", "overrides": ["train.progress_bar=false", "model.scan_layers=false"],
        "batch_size": 4, "max_length": 32, "warmup_fraction": 0.1,
        "budget": {"k": 512, "p": 0, "min_steps": 4},  # 512 tokens = 4 steps of 4 x 32
        "eval": {"batches": 2, "fractions": [0.5, 1.0]},
        "fit": {"bootstrap": 20},
        "sizes": [{"name": "a", "d_model": 16, "n_layers": 1, "n_heads": 2, "learning_rate": 3e-3},
                  {"name": "b", "d_model": 32, "n_layers": 1, "n_heads": 2, "learning_rate": 3e-3}],
    }
    path = records / "ladder.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_micro_ladder_runs_skips_finished_sizes_and_resumes(records, tmp_path, capsys, jax_cache):
    out = tmp_path / "ladder"
    ladder = _ladder(records, out)
    assert cli_main(["scaling", "--ladder", str(ladder)]) == 0
    text = capsys.readouterr().out
    assert "[2/2] b:" in text and "wrote" in text
    rows = (out / "ladder.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 1 + 4 and "nll_sequence" in header and "nll_ss8" in header and "flops" in header
    table = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert [(r["size"], int(r["step"])) for r in table] == [("a", 2), ("a", 4), ("b", 2), ("b", 4)]
    for r in table:
        assert 0 < float(r["nll_sequence"]) < 10 and 0 < float(r["nll_ss8"]) < 10
        assert int(r["tokens"]) == int(r["step"]) * 4 * 32
    # FLOPs grow with the step and with the size.
    assert float(table[1]["flops"]) == pytest.approx(2 * float(table[0]["flops"]))
    assert float(table[2]["flops"]) > float(table[0]["flops"])
    fit = json.loads((out / "fit.json").read_text())
    assert fit["sizes_finished"] == ["a", "b"] and set(fit["fits"]) == {"sequence", "ss8"}
    assert (out / "ladder.png").stat().st_size > 10_000

    # Rerun: nothing is trained again.
    evals_b = (out / "b" / "evals.jsonl").read_text()
    assert cli_main(["scaling", "--ladder", str(ladder)]) == 0
    text = capsys.readouterr().out
    assert "a: finished earlier" in text and "b: finished earlier" in text
    assert (out / "b" / "evals.jsonl").read_text() == evals_b

    # An interrupted size: its last checkpoint, last evaluation and done.json gone. It resumes from
    # the checkpoint before (step 3), trains step 4 again and evaluates it to the same NLL.
    first = [json.loads(line) for line in evals_b.splitlines()]
    (out / "b" / "done.json").unlink()
    shutil.rmtree(out / "b" / "checkpoints" / "4")
    (out / "b" / "evals.jsonl").write_text(json.dumps(first[0]) + "\n")
    assert cli_main(["scaling", "--ladder", str(ladder)]) == 0
    text = capsys.readouterr().out
    assert "a: finished earlier" in text and "resumed from step 3" in text
    again = [json.loads(line) for line in (out / "b" / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [2, 4]
    for track, v in first[1]["nll"].items():
        assert again[1]["nll"][track] == pytest.approx(v, rel=1e-5)


def test_bad_ladder_exits_2(records, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train_data": "x", "valid_data": "y", "sizes": [], "budget": {"k": 1}}))
    assert cli_main(["scaling", "--ladder", str(bad)]) == 2
    assert "list at least one model size" in capsys.readouterr().err
    assert cli_main(["scaling", "--ladder", str(tmp_path / "nope.yaml")]) == 2
    ladder = yaml.safe_load(_ladder(records, tmp_path / "o").read_text())
    ladder["budget"]["typo"] = 1
    bad.write_text(yaml.safe_dump(ladder))
    assert cli_main(["scaling", "--ladder", str(bad)]) == 2
    assert "unknown key 'typo'" in capsys.readouterr().err
