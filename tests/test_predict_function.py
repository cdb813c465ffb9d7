"""`esm3-jax predict-function` (data/function_prediction.py): the read-out of function tokens
through a function vocabulary, residue annotations as the reference samples them, and the verb
end to end on a tiny random ESM3 (and a tiny random function decoder), seeding and bad input."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from esm3_jax.data import function_tokens as ft
from tests.paths import CONFIGS, STRUCTURES

NATIVE = "mdanalysis_mmcif/5PTI.cif.gz"  # BPTI, 58 residues
TEXTS = {
    "kin": ["protein kinase domain, atp binding, serine threonine kinase"],
    "zf": ["zinc finger, c2h2 type, dna binding"],
    "prot": ["trypsin like serine protease, peptidase s1"],
    "glob": ["globin, oxygen transport, heme binding"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, jax_cache):
    """A random tiny ESM3, a random tiny function decoder with its label lists, and a function
    vocabulary built from TEXTS. (Compiled programs go to the shared persistent cache.)"""
    from esm3_jax.compat.function_decoder_weights import INTERPRO_FILE, KEYWORDS_FILE
    from esm3_jax.compat.params_io import save_params
    from esm3_jax.config import to_dict
    from esm3_jax.model.esm3 import init_params
    from esm3_jax.model.function_decoder import FunctionDecoderConfig, FunctionTokenDecoder
    from esm3_jax.train.config import load_config

    tmp = tmp_path_factory.mktemp("predict_function")
    cfg = load_config(CONFIGS / "tiny.yaml").model
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(3)))
    esm3 = save_params(tmp / "esm3", params, to_dict(cfg), "esm3")
    vocab = ft.build_function_vocab(TEXTS, seed=1)
    vocab_dir = ft.save_function_vocab(vocab, tmp / "vocab")
    dcfg = FunctionDecoderConfig(d_model=16, n_heads=2, n_layers=1, keyword_vocabulary_size=len(vocab.keywords),
                                 num_interpro_classes=3)
    tok = np.full((2, 8), T.FUNCTION_LSH_OFFSET, np.int32)
    dvars = nn.unbox(jax.jit(FunctionTokenDecoder(dcfg).init)(jax.random.PRNGKey(5), tok))
    fdec = save_params(tmp / "fdec", {"params": dvars["params"]}, to_dict(dcfg), "function-decoder")
    (fdec / KEYWORDS_FILE).write_text("\n".join(vocab.keywords) + "\n")
    (fdec / INTERPRO_FILE).write_text("IPR000001\nIPR000002\nIPR000003\n")
    return cfg, params, esm3, vocab, vocab_dir, fdec


def test_vocab_read_out_recovers_tokenized_annotations(setup):
    """Tokens made from known annotations decode back to exactly those labels and ranges
    (Hamming distance 0, similarity 1), a bare keyword as the keyword; <none> residues and a
    short run are left out."""
    from esm3_jax.data.function_prediction import read_out
    from esm3_jax.data.function_tokens import FunctionAnnotation as A

    *_, vocab, _, _ = setup
    L = 40
    annotations = [A("kin", 1, 12), A("zf", 20, 31), A("oxygen", 34, 40), A("prot", 15, 16)]
    tokens = ft.tokenize_function_annotations(vocab, annotations, L)
    assert (tokens[12:14] == T.FUNCTION_NONE).all()
    out = read_out(tokens, np.full((L, T.RESIDUE_VOCAB_SIZE), -5.0, np.float32), vocab,
                   residue_names=[str(i) for i in range(T.RESIDUE_VOCAB_SIZE)])
    got = [(r["label"], r["start"], r["end"], r["kind"]) for r in out["function_keywords"]]
    assert got == [("kin", 1, 12, "label"), ("zf", 20, 31, "label"), ("oxygen", 34, 40, "keyword")]
    assert all(r["score"] == 1.0 for r in out["function_keywords"])
    assert out["function_keywords"][0]["keywords"][0] in vocab.label_keywords["kin"]
    assert out["residue_annotations"] == []  # every logit -5: sigmoid < 0.5
    nearest = np.array(out["vocab_nearest_hamming"])
    assert (nearest[12:14] == -1).all() and (nearest[:12] == 0).all() and (nearest[19:31] == 0).all()


def test_residue_annotations_as_the_reference_samples(setup):
    torch = pytest.importorskip("torch")
    pytest.importorskip("esm.sdk.api")  # before esm.utils.sampling, which it imports circularly
    from esm.utils.sampling import sample_residue_annotation_logits

    from esm3_jax.data.function_prediction import residue_annotation_hits

    rng = np.random.default_rng(0)
    logits = rng.normal(-2.0, 2.0, size=(30, T.RESIDUE_VOCAB_SIZE)).astype(np.float32)
    logits[:, :4] += 3.0  # specials and <none> among the top: never reported
    ids, _ = sample_residue_annotation_logits(torch.from_numpy(logits))
    want = {(p, int(i)) for p, row in enumerate(ids.numpy()) for i in row if i >= T.RESIDUE_FIRST_LABEL}
    got = residue_annotation_hits(logits)
    assert {(p, i) for p, i, _ in got} == want and len(want) > 30
    assert all(prob >= 0.5 for *_, prob in got)


def _run(argv, capsys):
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_predict_function_end_to_end(setup, tmp_path, capsys):
    from esm3_jax.data.function_prediction import function_inputs, predict_function

    cfg, params, esm3, vocab, vocab_dir, fdec = setup
    seqs = {"first": "MKTAYIAKQRQISFVKSHFSRQ", "second": "GSHMLEDPVDAFQLGGSWKAELVNQLSKEGVTAEEAKQLLE"}
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    base = ["predict-function", "--checkpoint", str(esm3), "--fasta", str(fasta), "--function-vocab", str(vocab_dir),
            "--function-decoder", str(fdec), "--num-steps", "3", "--seed", "4", "--min-length", "2"]
    printed = _run(base + ["--max-hits", "0", "--out", str(tmp_path / "a.json")], capsys)
    assert "first: 22 residues" in printed and "range" in printed and "predict-function: 2 protein(s)" in printed
    assert _run(base + ["--max-hits", "3", "--out", str(tmp_path / "b.json")], capsys).split("\n")[:-2] == printed.split("\n")[:-2]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert [p["name"] for p in a["proteins"]] == list(seqs)
    assert (a["max_hits"], b["max_hits"]) == (0, 3)
    keys = ("function_keywords", "residue_annotations", "decoder_keywords", "decoder_interpro")
    # Same seed, same output; --max-hits 3 keeps each list's 3 best (all lists ranked by score)
    # and counts the rest in left_out. Random weights: plenty of residue annotations to cut.
    assert len(a["proteins"][1]["residue_annotations"]) > 3
    for p, q in zip(a["proteins"], b["proteins"]):
        assert {k: v for k, v in p.items() if k not in keys + ("left_out",)} == {k: v for k, v in q.items() if k not in keys + ("left_out",)}
        for key in keys:
            scores = [r["score"] for r in p[key]]
            assert scores == sorted(scores, reverse=True) and p["left_out"][key] == 0
            assert q[key] == p[key][:3] and q["left_out"][key] == len(p[key]) - len(q[key])
    # The tokens are the engine's, and row 0's do not depend on its batch mate.
    tokens, _ = predict_function(cfg, params, [function_inputs(seqs["first"])], num_steps=3, seed=4)
    for p, seq in zip(a["proteins"], seqs.values()):
        assert p["length"] == len(seq) and p["sequence"] == seq
        tok = np.array(p["function_tokens"])
        assert tok.shape == (len(seq), 8) and (tok >= T.FUNCTION_NONE).all()
        for key in keys:
            for r in p[key]:
                assert {"start", "end", "label", "score"} <= set(r)
                assert 1 <= r["start"] <= r["end"] <= len(seq) and r["end"] - r["start"] + 1 >= 2
    np.testing.assert_array_equal(np.array(a["proteins"][0]["function_tokens"]), tokens[0])
    # Random weights: plenty of residue annotations, named by the reference's token names.
    assert any(r["label"].startswith("<ra:") for p in a["proteins"] for r in p["residue_annotations"])
    assert all(r["label"] in ("IPR000001", "IPR000002", "IPR000003") for p in a["proteins"] for r in p["decoder_interpro"])


def test_predict_function_from_structure(setup, tmp_path, capsys):
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES}")
    _, _, esm3, _, vocab_dir, _ = setup
    names = tmp_path / "names.txt"
    names.write_text("".join(f"site {i}\n" for i in range(T.RESIDUE_VOCAB_SIZE - 4)))
    out = tmp_path / "s.json"
    _run(["predict-function", "--checkpoint", str(esm3), "--structure", str(STRUCTURES / NATIVE), "--function-vocab",
          str(vocab_dir), "--residue-vocab", str(names), "--out", str(out)], capsys)
    (p,) = json.loads(out.read_text())["proteins"]
    assert p["name"] == "5PTI_A" and p["length"] == 58 and "decoder_keywords" not in p
    assert p["residue_annotations"] and all(r["label"].startswith("site ") for r in p["residue_annotations"])
    assert all(1 <= r["start"] <= r["end"] <= 58 for r in p["residue_annotations"])
    # Conditioning on the structure alone changes the prediction. (The file named for its chain:
    # the protein is still 5PTI_A, not 5PTI_A_A.)
    named = tmp_path / "5PTI_A.cif.gz"
    named.write_bytes((STRUCTURES / NATIVE).read_bytes())
    _run(["predict-function", "--checkpoint", str(esm3), "--structure", str(named), "--function-vocab",
          str(vocab_dir), "--structure-only", "--out", str(tmp_path / "t.json")], capsys)
    (q,) = json.loads((tmp_path / "t.json").read_text())["proteins"]
    assert q["name"] == "5PTI_A"
    assert q["function_tokens"] != p["function_tokens"]


def test_bad_input(setup, tmp_path, capsys):
    _, _, esm3, _, vocab_dir, fdec = setup

    def fails(argv, *needles):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        for n in needles:
            assert n in err, (n, err)

    pf = ["predict-function", "--checkpoint", str(esm3), "--function-vocab", str(vocab_dir)]
    fails(pf + ["--sequence", "MKTAYJAK"], "'J' at position 6")
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    fails(pf + ["--fasta", str(empty)], "empty.fasta")
    water = tmp_path / "water.pdb"
    water.write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00  0.00           O\nEND\n")
    fails(pf + ["--structure", str(water)], "water.pdb", "no protein")
    fails(pf + ["--sequence", "MKT", "--chain", "A"], "--structure")
    fails(["predict-function", "--checkpoint", str(fdec), "--function-vocab", str(vocab_dir), "--sequence", "MKT"],
          str(fdec), "not esm3")
    fails(pf + ["--sequence", "MKT", "--function-decoder", str(esm3)], str(esm3), "not a function-decoder")
    fails(["predict-function", "--checkpoint", str(esm3), "--function-vocab", str(tmp_path / "novocab"), "--sequence", "MKT"],
          "novocab")
    bad_names = tmp_path / "names.csv"
    bad_names.write_text("label,label_clean,count\nx,y,many\n")
    fails(pf + ["--sequence", "MKT", "--residue-vocab", str(bad_names)], "names.csv")

    fails(pf + ["--sequence", "MKT", "--max-hits", "-1"], "--max-hits must be >= 0")
