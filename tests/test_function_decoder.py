"""The function-token decoder (model/function_decoder.py) against the reference's
FunctionTokenDecoder on identical random weights, its decode against the reference's decode, and
`convert --kind function-decoder` both ways, bit-exact."""

from __future__ import annotations

import types

import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from tests.reference import import_reference

KEYWORDS = ["kinase", "atp binding", "zinc finger", "protease", "serine", "dna binding", "membrane"]
INTERPRO = ["IPR000003", "IPR000001", "IPR000010", "IPR000002", "IPR000005"]


def _label_files(tmp_path):
    kw = tmp_path / "keywords.txt"
    kw.write_text("\n".join(KEYWORDS) + "\n")
    ipr = tmp_path / "entries.list"
    ipr.write_text("ENTRY_AC\tENTRY_TYPE\tENTRY_NAME\n" + "".join(f"{a}\tDomain\tname {a}\n" for a in INTERPRO))
    return kw, ipr


def _reference_decoder(tmp_path, unpack: bool = True, seed: int = 0):
    """The reference decoder, tiny, every parameter random (LayerNorms included)."""
    torch, _ = import_reference()
    from esm.models.function_decoder import FunctionTokenDecoder, FunctionTokenDecoderConfig

    kw, ipr = _label_files(tmp_path)
    cfg = FunctionTokenDecoderConfig(d_model=32, n_heads=2, n_layers=2, num_interpro_classes=len(INTERPRO),
                                     keyword_vocabulary_size=len(KEYWORDS), interpro_entry_list=str(ipr),
                                     keyword_vocabulary_path=str(kw), unpack_lsh_bits=unpack)
    torch.manual_seed(seed)
    model = FunctionTokenDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return torch, model, kw, ipr


def _tokens(n: int, seed: int = 1) -> np.ndarray:
    """(n, 8) function tokens: mostly LSH ids, some rows with a special id somewhere (those are
    read as all-zero inputs by the unpacked decoder)."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(T.FUNCTION_LSH_OFFSET, T.FUNCTION_VOCAB_SIZE, size=(n, T.FUNCTION_DEPTH))
    tok[[2, 7, 8, 9]] = T.FUNCTION_NONE
    tok[5, 3] = T.FUNCTION_UNK
    tok[11, 0] = T.FUNCTION_PAD
    return tok.astype(np.int32)


@pytest.mark.parametrize("unpack", [True, False])
def test_forward_matches_reference(tmp_path, unpack):
    import jax

    from esm3_jax.compat.function_decoder_weights import function_decoder_from_torch
    from esm3_jax.model.function_decoder import FunctionTokenDecoder

    torch, ref, _, _ = _reference_decoder(tmp_path, unpack)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg, variables = function_decoder_from_torch(state, n_heads=2)
    assert cfg.unpack_lsh_bits == unpack and cfg.n_layers == 2 and cfg.d_model == 32
    tok = _tokens(24)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in ref(torch.from_numpy(tok.astype(np.int64))).items()}
    got = jax.jit(FunctionTokenDecoder(cfg).apply)(variables, tok)
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), want[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_decode_matches_reference(tmp_path):
    """Keyword and InterPro ranges (thresholds, gap merging, minimum length) equal the
    reference decode's, on tokens with runs of one token set and gaps between them."""
    from esm3_jax.compat.function_decoder_weights import function_decoder_from_torch, read_interpro_entries
    from esm3_jax.inference.function_decoder import FunctionDecoder, decode_function_tokens

    torch, ref, _, ipr = _reference_decoder(tmp_path, seed=3)
    cfg, variables = function_decoder_from_torch({k: v.detach().numpy() for k, v in ref.state_dict().items()}, 2)
    rng = np.random.default_rng(5)
    sets = rng.integers(T.FUNCTION_LSH_OFFSET, T.FUNCTION_VOCAB_SIZE, size=(4, T.FUNCTION_DEPTH))
    # 40 residues: runs of token sets, a 2-residue gap of <none> (merged), a long <none> stretch.
    which = [0] * 9 + [-1] * 2 + [0] * 4 + [1] * 6 + [-1] * 8 + [2] * 3 + [3] * 8
    body = np.array([sets[w] if w >= 0 else [T.FUNCTION_NONE] * 8 for w in which], np.int32)
    framed = np.concatenate([np.zeros((1, 8), np.int32), body, np.zeros((1, 8), np.int32)])
    tokenizer = types.SimpleNamespace(depth=8, vocab_to_index={"<pad>": 0, "<motif>": 1, "<unk>": 2, "<none>": 3})
    with torch.no_grad():
        out = ref.decode(torch.from_numpy(framed.astype(np.int64)), tokenizer)
    want_kw = {(a.label, a.start, a.end) for a in out["function_keywords"]}
    want_ipr = {(a.label, a.start, a.end) for a in out["interpro_annotations"]}
    dec = FunctionDecoder(cfg, variables, tuple(KEYWORDS), tuple(read_interpro_entries(ipr)))
    got = decode_function_tokens(dec, body)
    assert {(r["label"], r["start"], r["end"]) for r in got["keywords"]} == want_kw
    assert {(r["label"], r["start"], r["end"]) for r in got["interpro"]} == want_ipr
    assert want_kw and want_ipr  # the comparison is not vacuous
    for r in got["keywords"]:
        assert r["score"] >= 0.5 and 1 <= r["start"] <= r["end"] <= len(body)


def test_convert_both_ways_bit_exact(tmp_path, capsys):
    import jax

    from esm3_jax.compat.params_io import load_params
    from esm3_jax.inference.function_decoder import FunctionDecoder

    torch, ref, kw, ipr = _reference_decoder(tmp_path)
    pth = tmp_path / "fdec.pth"
    torch.save(ref.state_dict(), pth)
    ck = tmp_path / "fdec"
    assert main(["convert", "--kind", "function-decoder", "--torch-state-dict", str(pth), "--out", str(ck), "--n-heads", "2",
                 "--keyword-vocabulary", str(kw), "--interpro-entries", str(ipr)]) == 0
    dec = FunctionDecoder.load(ck)
    assert dec.keywords == tuple(KEYWORDS) and dec.interpro_ids == tuple(sorted(INTERPRO))
    back = tmp_path / "back.pth"
    assert main(["convert", "--export", str(ck), "--out", str(back)]) == 0
    a, b = ref.state_dict(), torch.load(back, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ...and ours -> torch -> ours.
    ck2 = tmp_path / "fdec2"
    assert main(["convert", "--kind", "function-decoder", "--torch-state-dict", str(back), "--out", str(ck2), "--n-heads", "2",
                 "--keyword-vocabulary", str(kw), "--interpro-entries", str(ipr)]) == 0
    (k1, c1, p1), (k2, c2, p2) = load_params(ck), load_params(ck2)
    assert k1 == k2 == "function-decoder" and c1 == c2
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), p1, p2)
    assert (ck / "keyword_vocabulary.txt").read_text() == (ck2 / "keyword_vocabulary.txt").read_text()
    capsys.readouterr()
    # Label lists that do not fit the heads, and a checkpoint of another kind: one line, exit 2.
    short = tmp_path / "short.txt"
    short.write_text("kinase\n")
    assert main(["convert", "--kind", "function-decoder", "--torch-state-dict", str(pth), "--out", str(tmp_path / "x"),
                 "--keyword-vocabulary", str(short), "--interpro-entries", str(ipr)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "short.txt" in err and "7 keywords" in err
    from esm3_jax.compat.params_io import save_params

    other = save_params(tmp_path / "other", {"params": {"w": np.zeros(2, np.float32)}}, {}, "structure-decoder")
    with pytest.raises(ValueError, match="not a function-decoder"):
        FunctionDecoder.load(other)
