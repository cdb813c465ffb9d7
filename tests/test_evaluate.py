"""`esm3-jax evaluate`: the conditioning mask on a hand-made batch, then the verb end to end on a
short tiny run over demo records (deterministic, JSON equal to the table, a trained model below
a random one), and bad input exiting 2."""

import gzip
import json
import math

import jax
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.batch import TRACKS, shapes
from esm3_jax.cli import main as cli_main
from esm3_jax.eval import nll
from tests.paths import DEMO, REPO

STEPS = 40


def _hand_batch():
    """One row: BOS, 4 residues, chain break, 2 residues, EOS, 2 pad; every track labelled."""
    B, L = 1, 11
    batch = {k: np.zeros(s, d) for k, (s, d) in shapes(B, L).items()}
    seq = np.array([[T.SEQUENCE_BOS, 5, 6, 7, 8, T.SEQUENCE_CHAINBREAK, 9, 10, T.SEQUENCE_EOS,
                     T.SEQUENCE_PAD, T.SEQUENCE_PAD]], np.int32)
    res = ~np.isin(seq, [T.SEQUENCE_BOS, T.SEQUENCE_EOS, T.SEQUENCE_PAD, T.SEQUENCE_CHAINBREAK])
    struct = np.where(res, 17, T.STRUCTURE_PAD).astype(np.int32)
    struct[0, 0], struct[0, 8], struct[0, 5] = T.STRUCTURE_BOS, T.STRUCTURE_EOS, T.STRUCTURE_CHAINBREAK
    ss8 = np.where(res, T.SS8_UNK + 2, 0).astype(np.int32)
    sasa = np.where(res, T.SASA_FIRST_BIN + 1, 0).astype(np.int32)
    fn = np.where(res[..., None], 7, 0).astype(np.int32) * np.ones((1, 1, T.FUNCTION_DEPTH), np.int32)
    ra = np.where(res[..., None], 3, 0).astype(np.int32) * np.ones((1, 1, T.RESIDUE_MAX_ANNOTATIONS), np.int32)
    coords = np.where(res[..., None, None], 1.5, np.nan).astype(np.float32) * np.ones((1, 1, 3, 3), np.float32)
    for track, value in (("sequence", seq), ("structure", struct), ("ss8", ss8), ("sasa", sasa),
                         ("function", fn), ("residue_annotation", ra)):
        batch[f"{track}_tokens"], batch[f"{track}_target"] = value.copy(), value.copy()
        batch[f"{track}_loss_mask"] = res.copy()  # whatever it was: the conditioning replaces it
    batch["structure_coords"] = coords
    batch["per_res_plddt"] = np.where(res, 0.9, 0.0).astype(np.float32)
    batch["average_plddt"] = np.full((B, L), 0.9, np.float32)
    batch["sequence_id"] = np.where(seq != T.SEQUENCE_PAD, 1, 0).astype(np.int32)
    return batch, res


@pytest.mark.parametrize("target,given", [(t, g) for t, gs in nll.CONDITIONS.items() for g in gs])
def test_condition_batch_masks_the_target_fully_and_gives_exactly_one_track(target, given):
    clean, res = _hand_batch()
    before = {k: v.copy() for k, v in clean.items()}
    out = nll.condition_batch(clean, target, given)
    for k in clean:  # pure: the input is untouched
        np.testing.assert_array_equal(clean[k], before[k])
    # targets unchanged; the loss mask is exactly the target's residue positions
    for t in TRACKS:
        np.testing.assert_array_equal(out[f"{t}_target"], clean[f"{t}_target"])
        np.testing.assert_array_equal(out[f"{t}_loss_mask"], res if t == target else np.zeros_like(res))
    mask_id = {"sequence": T.SEQUENCE_MASK, "structure": T.STRUCTURE_MASK}
    for t in ("sequence", "structure", "ss8", "sasa", "function", "residue_annotation"):
        key = f"{t}_tokens"
        if t == given:
            np.testing.assert_array_equal(out[key], clean[key])
            continue
        m = mask_id.get(t, 0)
        at_res = out[key][res]
        assert (at_res == m).all(), (t, at_res)
        # BOS / EOS / chain break / pad untouched
        np.testing.assert_array_equal(out[key][~res], clean[key][~res])
    if given == "coordinates":
        np.testing.assert_array_equal(out["structure_coords"], clean["structure_coords"])
        np.testing.assert_array_equal(out["per_res_plddt"], clean["per_res_plddt"])
    else:
        assert np.isnan(out["structure_coords"]).all() and not out["per_res_plddt"].any()
    for k in ("sequence_id", "chain_id", "average_plddt"):
        np.testing.assert_array_equal(out[k], clean[k])


def test_condition_batch_refuses_nonsense():
    clean, _ = _hand_batch()
    with pytest.raises(ValueError, match="cannot also be given"):
        nll.condition_batch(clean, "sequence", "sequence")
    with pytest.raises(ValueError, match="unknown conditioning track"):
        nll.condition_batch(clean, "sequence", "plddt")


# --- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jax_cache):
    """Demo records (train: 200 chains; valid: the bundled valid chains), a random-init params
    checkpoint and a short tiny run from the same seed."""
    if not DEMO.is_dir():
        pytest.skip(f"{DEMO} is missing")
    from esm3_jax.compat import params_io
    from esm3_jax.config import to_dict
    from esm3_jax.train.config import load_config
    from esm3_jax.train.loop import train
    from esm3_jax.train.setup import setup_training

    work = tmp_path_factory.mktemp("evaluate")
    src = work / "chains.jsonl"
    with gzip.open(DEMO / "pdb_chains_train.jsonl.gz", "rt") as f:
        src.write_text("".join(line for _, line in zip(range(200), f)))
    for split, inp in (("train", src), ("valid", DEMO / "pdb_chains_valid.jsonl.gz")):
        assert cli_main(["preprocess", str(inp), "-o", str(work / split), "-j", "1", "--no-progress"]) == 0
    overrides = [
        f"train.output_dir={work / 'run'}", f"train.steps={STEPS}", "train.warmup_steps=4",
        "train.learning_rate=0.003", f"train.checkpoint_every={STEPS}", "train.eval_every=1000",
        "train.progress_bar=false", f"data.datasets=[{{path: {work / 'train'}}}]",
        f"train.eval_datasets=[{{path: {work / 'valid'}}}]", "data.max_length=64", "data.batch_size=8",
    ]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    fresh = setup_training(cfg, jax.devices()).fresh_state().params
    params_io.save_params(work / "random", fresh, to_dict(cfg.model), params_io.ESM3_KIND)
    train(cfg)
    return work


def _evaluate(work, checkpoint, capsys, *extra):
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(work / "valid"), "--config",
            str(REPO / "configs" / "tiny.yaml"), "--batches", "3", "--no-progress",
            "data.max_length=64", "data.batch_size=8", *extra]
    capsys.readouterr()
    rc = cli_main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _row(rows, target, given=None):
    return next(r for r in rows if r["target"] == target and r.get("given") == given)


def test_evaluate_is_deterministic_finite_and_learned(runs, capsys):
    work = runs
    out1 = _evaluate(work, work / "run", capsys, "--json", str(work / "a.json"))
    out2 = _evaluate(work, work / "run", capsys, "--json", str(work / "b.json"))
    a, b = json.loads((work / "a.json").read_text()), json.loads((work / "b.json").read_text())
    assert a == b and out1 == out2.replace("b.json", "a.json")
    # the JSON is what was printed
    assert nll.format_tables(a) in out1
    seq = _row(a["training_noise"], "sequence")
    assert math.isfinite(seq["nll"]) and seq["positions"] > 0
    assert seq["perplexity"] == pytest.approx(math.exp(seq["nll"]))
    for r in a["training_noise"] + a["conditioning"]:
        assert r["nll"] is None or math.isfinite(r["nll"])
    # the valid split is sequence + SS8 only: structure rows say "no labels", not nan
    assert _row(a["conditioning"], "structure", "nothing")["note"] == "no labels"
    assert "no labels" in _row(a["conditioning"], "sequence", "coordinates")["note"]
    assert "no labels" in out1 and "nan" not in out1
    ss8_given = _row(a["conditioning"], "sequence", "ss8")
    assert math.isfinite(ss8_given["nll"]) and ss8_given["positions"] > 0
    # unigram baseline of the sequence: a real entropy, below ln(20)+
    assert 2.5 < seq["unigram_nll"] < math.log(21)

    capsys.readouterr()
    _evaluate(work, work / "random", capsys, "--json", str(work / "r.json"))
    r = json.loads((work / "r.json").read_text())
    random_nll = _row(r["training_noise"], "sequence")["nll"]
    # A random init is no better than uniform over the 20 amino acids; its logits are not flat
    # (the head has 64 rows), so it sits somewhat above ln(64) rather than at ln(20)..ln(33).
    assert math.log(20) < random_nll < math.log(64) + 1.0
    assert seq["nll"] < random_nll - 0.3, (seq["nll"], random_nll)


def test_bad_input_exits_2(runs, tmp_path, capsys):
    work = runs
    base = ["evaluate", "--data", str(work / "valid"), "--no-progress", "--batches", "1"]
    cases = {
        "missing": (["--checkpoint", str(tmp_path / "nope")], "nope"),
        "no manifest": (["--checkpoint", str(work / "run"), "--data", str(tmp_path)], str(tmp_path)),
        "not a checkpoint": (["--checkpoint", str(work / "valid")], str(work / "valid")),
    }
    # a checkpoint of the wrong kind
    wrong = tmp_path / "enc"
    wrong.mkdir()
    (wrong / "esm3_jax.yaml").write_text("kind: structure-encoder\nmodel: {}\n")
    cases["wrong kind"] = (["--checkpoint", str(wrong)], str(wrong))
    # a model the config's mesh cannot shard: 4 heads over a tensor axis of 3 devices
    cases["mesh"] = (["--checkpoint", str(work / "random"), "mesh.tensor=3", "mesh.data=1"], str(work / "random"))
    for name, (extra, path) in cases.items():
        capsys.readouterr()
        rc = cli_main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2, name
        assert path in err and err.count("\n") == 1, (name, err)
