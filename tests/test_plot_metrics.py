"""plot-metrics: a PNG of a run's metrics.csv; bad files and columns give one clear error."""

import pytest

from esm3_jax.cli import main

pytest.importorskip("matplotlib")

CSV = "step,time_s,total,distance\n10,1.0,40.5,20.1\n20,2.0,30.2,15.0\n30,3.1,25.0,\n"


def test_plot_writes_a_png_per_run_set(tmp_path, capsys):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.csv").write_text(CSV)
    out = tmp_path / "curves.png"
    args = ["plot-metrics", str(tmp_path / "a" / "metrics.csv"), str(tmp_path / "b" / "metrics.csv"),
            "--out", str(out), "--columns", "total,distance", "--smooth", "2"]
    assert main(args) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert f"wrote {out}" in capsys.readouterr().out


def test_unknown_column_and_non_numeric_cell_are_named(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    assert main(["plot-metrics", str(path), "--out", str(tmp_path / "x.png"), "--columns", "total,lddt"]) == 2
    assert "no column(s) lddt" in capsys.readouterr().err
    path.write_text("step,total\n10,abc\n")
    assert main(["plot-metrics", str(path), "--out", str(tmp_path / "x.png"), "--columns", "total"]) == 2
    assert "line 2: column 'total' is not a number" in capsys.readouterr().err
    assert main(["plot-metrics", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such metrics file" in capsys.readouterr().err


def test_moving_average_skips_missing_values():
    from esm3_jax.eval.plot_metrics import moving_average

    assert moving_average([1.0, 3.0, float("nan"), 5.0], 2) == [1.0, 2.0, 2.0, 4.0]
