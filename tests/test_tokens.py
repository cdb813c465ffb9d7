"""Vocabularies: round trips, exact id equality with the reference `esm` tokenizers, and errors."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import numpy as np
import pytest

from esm3_jax import tokens as T
from tests.paths import DATA

SIDECHAINNET = DATA / "sequences" / "pdb_chains_seq_dssp8.sidechainnet.jsonl.gz"

RESIDUE_LETTERS = "LAGVSERTIDPKQNFYMHWC"
RNG = np.random.default_rng(0)


def _reference():
    """The reference package's tokenizers, built directly (no hub download); skip if absent."""
    pytest.importorskip("torch")
    tok = pytest.importorskip("esm.tokenization")
    return tok


# --- sequence ----------------------------------------------------------------------------------


def test_sequence_vocabulary_ids():
    assert len(T.SEQUENCE_VOCAB) == 33
    assert T.SEQUENCE_VOCAB[T.SEQUENCE_MASK] == "<mask>"
    assert T.SEQUENCE_VOCAB[T.SEQUENCE_CHAINBREAK] == "|"
    assert T.encode_sequence("AC").tolist() == [0, 5, 23, 2]
    assert T.encode_sequence("AC", add_special_tokens=False).dtype == np.int32


@pytest.mark.parametrize(
    "text",
    ["", "ACDEFGHIKLMNPQRSTVWY", "A_C__", "MKV|GSA", "XBUZO.-", "A<unk>C<mask>", "<cls>AC<eos><pad>"],
)
def test_sequence_round_trip(text):
    ids = T.encode_sequence(text, add_special_tokens=False)
    assert T.decode_sequence(ids, strip_special=False) == text.replace("<mask>", "_")


def test_sequence_random_round_trip():
    alphabet = np.array(list(RESIDUE_LETTERS + "XBUZO.-|_"))
    for length in (1, 7, 300):
        text = "".join(RNG.choice(alphabet, size=length))
        ids = T.encode_sequence(text)
        assert ids.shape == (length + 2,)
        assert T.decode_sequence(ids) == text


def test_sequence_strip_special_drops_framing_and_padding():
    ids = np.array([0, 5, 32, 3, 31, 23, 2, 1, 1])
    assert T.decode_sequence(ids) == "A_<unk>|C"
    assert T.decode_sequence(ids, strip_special=False) == "<cls>A_<unk>|C<eos><pad><pad>"


def test_sequence_matches_reference():
    tok = _reference()
    from esm.utils import encoding

    ref = tok.EsmSequenceTokenizer()
    cases = [RESIDUE_LETTERS, "XBUZO.-|", "MK__V|GS_A", "A<mask>C<unk>", "", "W"]
    cases += ["".join(RNG.choice(list(RESIDUE_LETTERS + "_|X"), size=50)) for _ in range(5)]
    for text in cases:
        expected = encoding.tokenize_sequence(text, ref, add_special_tokens=True).tolist()
        assert T.encode_sequence(text).tolist() == expected, text
        assert T.decode_sequence(np.asarray(expected)) == text.replace("<mask>", "_")
    # Every vocabulary entry, one at a time.
    for idx, word in enumerate(T.SEQUENCE_VOCAB):
        assert ref.convert_tokens_to_ids(word) == idx
    assert ref.vocab_size == len(T.SEQUENCE_VOCAB)
    assert (ref.cls_token_id, ref.pad_token_id, ref.eos_token_id, ref.mask_token_id, ref.chain_break_token_id) == (
        T.SEQUENCE_BOS,
        T.SEQUENCE_PAD,
        T.SEQUENCE_EOS,
        T.SEQUENCE_MASK,
        T.SEQUENCE_CHAINBREAK,
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("AJC", r"character 'J' at position 2 is not in the ESM3 sequence vocabulary"),
        ("ACDa", r"character 'a' at position 4"),
        ("AC D", r"character ' ' at position 3"),
        ("ACé", r"character 'é' at position 3"),
        ("A<foo>C", r"token '<foo>' at position 2"),
        ("AC<mask", r"unterminated '<' at position 3"),
    ],
)
def test_sequence_bad_input(text, match):
    with pytest.raises(T.TokenError, match=match):
        T.encode_sequence(text)


def test_sequence_bad_ids():
    with pytest.raises(T.TokenError, match=r"sequence: token id 40 at position 2 is outside 0..32"):
        T.decode_sequence([0, 40, 2])
    with pytest.raises(T.TokenError, match=r"expected a 1-D array of token ids, got shape \(1, 3\)"):
        T.decode_sequence([[0, 5, 2]])
    with pytest.raises(T.TokenError, match=r"sequence: expected a string, got list"):
        T.encode_sequence(["A", "C"])


def test_never_sampled_ids_match_reference():
    tok = _reference()
    assert list(T.SEQUENCE_NEVER_SAMPLED) == sorted(tok.get_invalid_tokenizer_ids(tok.EsmSequenceTokenizer()))
    assert sorted(T.STRUCTURE_NEVER_SAMPLED) == sorted(tok.get_invalid_tokenizer_ids(tok.StructureTokenizer()))
    for ours, ref in [
        (T.SS8_NEVER_SAMPLED, tok.SecondaryStructureTokenizer("ss8")),
        (T.SASA_NEVER_SAMPLED, tok.SASADiscretizingTokenizer()),
        (T.FUNCTION_NEVER_SAMPLED, tok.InterProQuantizedTokenizer()),
    ]:
        assert list(ours) == sorted(set(tok.get_invalid_tokenizer_ids(ref)))


# --- structure tokens --------------------------------------------------------------------------


def test_structure_round_trip():
    codes = [0, 4095, -1, 955, None, 17]
    ids = T.encode_structure_tokens(codes)
    assert ids.tolist() == [4098, 0, 4095, 4096, 955, 4096, 17, 4097]
    assert T.decode_structure_tokens(ids).tolist() == [0, 4095, -1, 955, -1, 17]
    random_codes = RNG.integers(-1, 4096, size=500)
    assert np.array_equal(T.decode_structure_tokens(T.encode_structure_tokens(random_codes)), random_codes)
    # chain break / pad inside decode to "not a code"
    assert T.decode_structure_tokens([4098, 5, 4100, 4099, 4097]).tolist() == [5, -1, -1]


def test_structure_matches_reference():
    tok = _reference()
    from esm.utils import encoding

    ref = tok.StructureTokenizer()
    assert (ref.mask_token_id, ref.eos_token_id, ref.bos_token_id, ref.pad_token_id, ref.chain_break_token_id) == (
        T.STRUCTURE_MASK,
        T.STRUCTURE_EOS,
        T.STRUCTURE_BOS,
        T.STRUCTURE_PAD,
        T.STRUCTURE_CHAINBREAK,
    )
    assert len(ref.all_token_ids) == T.STRUCTURE_VOCAB_SIZE
    default = encoding.get_default_structure_tokens(5, ref).tolist()
    assert T.encode_structure_tokens([None] * 5).tolist() == default


def test_structure_bad_input():
    with pytest.raises(T.TokenError, match=r"structure: code 4096 at position 3 is outside 0..4095"):
        T.encode_structure_tokens([1, 2, 4096])
    with pytest.raises(T.TokenError, match=r"structure: code -2 at position 1 is outside"):
        T.encode_structure_tokens(np.array([-2, 0]))
    with pytest.raises(T.TokenError, match=r"structure: code 1.5 at position 2 is not an integer"):
        T.encode_structure_tokens([1, 1.5])
    with pytest.raises(T.TokenError, match=r"expected BOS 4098 at the first position and EOS 4097 at the last"):
        T.decode_structure_tokens([4097, 5, 4098])
    with pytest.raises(T.TokenError, match=r"structure: token id 4101 at position 2 is outside 0..4100"):
        T.decode_structure_tokens([4098, 4101, 4097])


# --- SS8 ----------------------------------------------------------------------------------------


def test_ss8_round_trip_and_aliases():
    assert T.encode_ss8("GHITEBSC").tolist() == [0, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert T.decode_ss8(T.encode_ss8("HHEE_C")) == "HHEE_C"
    # coil spellings of the DSSP dialects all become C
    assert T.decode_ss8(T.encode_ss8("L P-.C")) == "CCCCCC"
    assert T.decode_ss8(T.encode_ss8("G<unk><motif>", add_special_tokens=False), strip_special=False) == (
        "G<unk><motif>"
    )


def test_ss8_matches_reference():
    tok = _reference()
    from esm.utils import encoding

    ref = tok.SecondaryStructureTokenizer(kind="ss8")
    assert ref.vocab == T.SS8_VOCAB
    for text in ["GHITEBSC", "HHHH__EEC", "", "".join(RNG.choice(list("GHITEBSC_"), size=120))]:
        expected = encoding.tokenize_secondary_structure(text, ref, add_special_tokens=True).tolist()
        assert T.encode_ss8(text).tolist() == expected
    # DSSP dialects: the reference only knows C for coil, and ours agrees after folding.
    assert T.encode_ss8("LP -.").tolist() == ref.encode("CCCCC").tolist()
    assert T.decode_ss8(ref.encode("HECT").numpy()) == "HECT"
    default = encoding.get_default_secondary_structure_tokens(4, ref).tolist()
    assert T.encode_ss8("____").tolist() == default


@pytest.mark.parametrize(
    "text, match",
    [
        ("HHXE", r"SS8: character 'X' at position 3 is not in the ESM3 SS8 vocabulary"),
        ("hh", r"SS8: character 'h' at position 1"),
        ("H!", r"SS8: character '!' at position 2"),
        ("H<mask>", r"SS8: token '<mask>' at position 2"),
    ],
)
def test_ss8_bad_input(text, match):
    with pytest.raises(T.TokenError, match=match):
        T.encode_ss8(text)


def test_ss8_bad_ids():
    with pytest.raises(T.TokenError, match=r"SS8: token id 11 at position 2 is outside 0..10"):
        T.decode_ss8([0, 11, 0])
    with pytest.raises(T.TokenError, match=r"SS8: expected BOS 0 at the first position and EOS 0 at the last"):
        T.decode_ss8([3, 4, 0])


# --- SASA ---------------------------------------------------------------------------------------


def _edge_probes() -> list[float]:
    """Each edge, and its float32 and float64 neighbours on both sides, plus 0 and large values."""
    probes = [0.0, 1e-9, 1000.0, math.inf]
    for edge in T.SASA_BIN_EDGES:
        e32 = np.float32(edge)
        probes += [edge, float(np.nextafter(e32, np.float32(0))), float(np.nextafter(e32, np.float32(1e9)))]
        probes += [float(np.nextafter(edge, 0.0)), float(np.nextafter(edge, 1e9))]
    return probes


def test_sasa_edges_and_round_trip():
    assert T.sasa_to_tokens([0.0, 0.8, 0.81, 4.0, 151.4, 151.5, math.inf]).tolist() == [0, 3, 3, 4, 4, 17, 18, 18, 0]
    values = np.array([0.3, 2.0, 100.0, 140.0, 300.0])
    decoded = T.tokens_to_sasa(T.sasa_to_tokens(values))
    assert decoded.tolist() == pytest.approx([0.4, 2.4, 100.25, 138.4, 151.4 * 1.5])
    # every bin id decodes to its midpoint and encodes back to itself
    ids = np.arange(T.SASA_FIRST_BIN, T.SASA_VOCAB_SIZE)
    assert T.sasa_to_tokens(T.tokens_to_sasa(ids, strip_special=False), add_special_tokens=False).tolist() == (
        ids.tolist()
    )


def test_sasa_missing_values():
    ids = T.sasa_to_tokens([1.0, None, math.nan, 5.0])
    assert ids.tolist() == [0, 4, T.SASA_PAD, T.SASA_UNK, 5, 0]
    assert np.isnan(T.tokens_to_sasa(ids)[1:3]).all()


def test_sasa_matches_reference():
    tok = _reference()
    import torch
    from esm.utils import encoding

    ref = tok.SASADiscretizingTokenizer()
    probes = _edge_probes() + [float(v) for v in RNG.uniform(0, 250, size=200)]
    # The reference is fed Python floats, one at a time, exactly as its tokenize_sasa does.
    expected = encoding.tokenize_sasa(probes + [None], ref).tolist()
    assert T.sasa_to_tokens(probes + [None]).tolist() == expected
    assert T.sasa_to_tokens(np.asarray(probes)).tolist() == expected[:-2] + [0]
    # NaN: the reference's bucketize puts it in the open last bin; we deliberately emit <unk>.
    assert encoding.tokenize_sasa([math.nan], ref).tolist() == [0, 18, 0]
    assert T.sasa_to_tokens([math.nan]).tolist() == [0, T.SASA_UNK, 0]
    # Decoding: the reference's float32 midpoints, NaN for the specials.
    all_ids = torch.arange(T.SASA_VOCAB_SIZE)
    ref_mid = ref.midpoints_tensor[all_ids].numpy()
    np.testing.assert_array_equal(T.tokens_to_sasa(all_ids.numpy(), strip_special=False), ref_mid)
    framed = torch.tensor([0, 3, 10, 18, 2, 0])
    ref_decoded = [math.nan if v is None else v for v in ref.decode_float(framed[1:-1])]
    np.testing.assert_array_equal(T.tokens_to_sasa(framed.numpy()), np.asarray(ref_decoded, np.float32))


def test_expected_sasa_matches_reference_sampler():
    _reference()
    import torch
    from esm.sdk.api import SamplingTrackConfig
    from esm.utils.sampling import sample_sasa_logits

    logits = RNG.normal(size=(2, 9, T.SASA_VOCAB_SIZE)).astype(np.float32) * 3
    logits[0, 4, 18] = 50.0  # argmax on the open last bin -> inf
    logits_t = torch.from_numpy(logits.copy())
    tokens = torch.zeros((2, 9), dtype=torch.long)
    tokens[:, 0] = tokens[:, -1] = 1  # framing positions are never sampled; keep them out of the mask
    config = SamplingTrackConfig(invalid_ids=[], only_sample_masked_tokens=False)
    ref = sample_sasa_logits(logits_t, tokens, config, mask_idx=0, valid_ids=list(range(19))).numpy()
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    ours = T.expected_sasa(probs)
    assert ours.shape == (2, 9)
    assert np.isinf(ours[0, 4])
    np.testing.assert_allclose(ours[:, 1:-1], ref[:, 1:-1], rtol=1e-5)


def test_sasa_bad_input():
    with pytest.raises(T.TokenError, match=r"SASA: value -1.0 at position 2 is negative"):
        T.sasa_to_tokens([1.0, -1.0])
    with pytest.raises(T.TokenError, match=r"SASA: values must be numbers or None"):
        T.sasa_to_tokens([1.0, "<pad>"])
    with pytest.raises(T.TokenError, match=r"SASA: expected a 1-D array of per-residue values, got shape \(2, 2\)"):
        T.sasa_to_tokens(np.ones((2, 2)))
    with pytest.raises(T.TokenError, match=r"SASA: token id 19 at position 1 is outside 0..18"):
        T.tokens_to_sasa([19], strip_special=False)
    with pytest.raises(T.TokenError, match=r"SASA: expected BOS 0 at the first position"):
        T.tokens_to_sasa([5, 5, 0])
    with pytest.raises(T.TokenError, match=r"SASA: expected probabilities of shape \(\.\.\., 19\), got \(3, 18\)"):
        T.expected_sasa(np.ones((3, 18)))


# --- function tokens ----------------------------------------------------------------------------


def test_function_tokens_round_trip():
    values = RNG.integers(0, 256, size=(6, 8))
    has = np.array([True, False, True, True, False, True])
    ids = T.function_tokens_from_lsh(values, has)
    assert ids.shape == (8, 8) and ids.dtype == np.int32
    assert (ids[0] == 0).all() and (ids[-1] == 0).all()
    assert (ids[2] == T.FUNCTION_NONE).all()
    assert ids[1].tolist() == (values[0] + 4).tolist()
    back_values, back_has = T.lsh_from_function_tokens(ids)
    assert np.array_equal(back_has, has)
    assert np.array_equal(back_values[has], values[has])
    assert (back_values[~has] == 0).all()


def test_function_tokens_match_reference():
    tok = _reference()
    from esm.utils import encoding

    ref = tok.InterProQuantizedTokenizer()
    assert len(ref.vocab) == T.FUNCTION_VOCAB_SIZE
    assert [ref.vocab_to_index[w] for w in ("<pad>", "<motif>", "<unk>", "<none>", "<lsh:0>", "<lsh:255>")] == [
        T.FUNCTION_PAD,
        T.FUNCTION_MOTIF,
        T.FUNCTION_UNK,
        T.FUNCTION_NONE,
        T.FUNCTION_LSH_OFFSET,
        T.FUNCTION_VOCAB_SIZE - 1,
    ]
    values = RNG.integers(0, 256, size=(4, 8))
    has = np.array([True, False, True, True])
    words = ["<lsh:" + ",".join(map(str, v)) + ">" if h else "<none>" for v, h in zip(values.tolist(), has)]
    assert T.function_tokens_from_lsh(values, has).tolist() == ref.encode(words).tolist()
    default = encoding.get_default_function_tokens(4, ref).tolist()
    assert T.encode_protein("ACDE")["function_tokens"].tolist() == default


def test_function_tokens_bad_input():
    values = np.zeros((2, 8), dtype=np.int64)
    values[1, 3] = 256
    with pytest.raises(T.TokenError, match=r"function: LSH value 256 at position 2, slot 4 is outside 0..255"):
        T.function_tokens_from_lsh(values, [True, True])
    T.function_tokens_from_lsh(values, [True, False])  # values of unannotated residues are ignored
    with pytest.raises(T.TokenError, match=r"function: expected LSH values of shape \(length, 8\), got \(2, 7\)"):
        T.function_tokens_from_lsh(np.zeros((2, 7)), [True, True])
    with pytest.raises(T.TokenError, match=r"function: has_annotation has shape \(3,\), expected \(2,\)"):
        T.function_tokens_from_lsh(np.zeros((2, 8)), [True, True, False])
    with pytest.raises(T.TokenError, match=r"function: token id 260 at position 1, slot 1 is outside 0..259"):
        T.validate_function_tokens(np.full((1, 8), 260))
    mixed = T.function_tokens_from_lsh(np.zeros((2, 8), dtype=int), [True, True])
    mixed[2, 5] = T.FUNCTION_NONE
    with pytest.raises(T.TokenError, match=r"function: row .* at position 2 is neither all <none> \(3\) nor all LSH"):
        T.lsh_from_function_tokens(mixed)


# --- residue annotations ------------------------------------------------------------------------


def test_residue_annotations_round_trip():
    per_residue = [None, [], [7], [1477, 4, 7, 4], list(range(4, 20))]
    ids = T.encode_residue_annotations(per_residue, 5)
    assert ids.shape == (7, 16) and ids.dtype == np.int32
    assert (ids[0] == 0).all() and (ids[-1] == 0).all()
    assert ids[2].tolist() == [3] + [0] * 15
    assert ids[4, :3].tolist() == [4, 7, 1477]
    assert T.decode_residue_annotations(ids) == [None, [], [7], [4, 7, 1477], list(range(4, 20))]
    assert (T.encode_residue_annotations(None, 3) == 0).all()


def test_residue_annotations_match_reference(tmp_path):
    tok = _reference()
    from esm.utils import encoding

    # A tiny label table stands in for the hub's CSV; encode() of explicit ids never consults it
    # beyond the special words.
    csv = tmp_path / "labels.csv"
    csv.write_text("label,label_clean,count\nsite a,A,10\nsite b,B,5\n")
    ref = tok.ResidueAnnotationsTokenizer(csv_path=str(csv))
    assert ref.vocab_to_index["<none>"] == T.RESIDUE_NONE
    words = ["<pad>", "<none>", "<ra:5,9>", "<ra:" + ",".join(map(str, range(4, 20))) + ">"]
    ours = T.encode_residue_annotations([None, [], [9, 5], range(4, 20)], 4)
    assert ours.tolist() == ref.encode(words).tolist()
    default = encoding.get_default_residue_annotation_tokens(4, ref).tolist()
    assert T.encode_protein("ACDE")["residue_annotation_tokens"].tolist() == default


def test_residue_annotations_bad_input():
    with pytest.raises(T.TokenError, match=r"residue annotations: 17 distinct ids at position 2, at most 16 fit"):
        T.encode_residue_annotations([[5], list(range(4, 21))], 2)
    with pytest.raises(T.TokenError, match=r"residue annotations: id 1478 at position 1 is outside 1..1477"):
        T.encode_residue_annotations([[1478]], 1)
    with pytest.raises(T.TokenError, match=r"residue annotations: id 0 at position 1 is outside 1..1477"):
        T.encode_residue_annotations([[0, 5]], 1)
    with pytest.raises(T.TokenError, match=r"<none> \(3\) at position 1 is mixed with other ids \[3, 9\]"):
        T.encode_residue_annotations([[3, 9]], 1)
    with pytest.raises(T.TokenError, match=r"residue annotations: entry 5 at position 1 is not a collection of integer"):
        T.encode_residue_annotations([5], 1)
    with pytest.raises(T.TokenError, match=r"residue annotations: got 2 entries for 3 residues"):
        T.encode_residue_annotations([[5], [6]], 3)
    with pytest.raises(T.TokenError, match=r"residue annotations: id 1500 at position 2 is outside 0..1477"):
        T.decode_residue_annotations(np.array([[0] * 16, [1500] + [0] * 15]))


# --- pLDDT --------------------------------------------------------------------------------------


def test_plddt_rbf_matches_reference():
    _reference()
    import torch
    from esm.utils.misc import rbf

    values = np.array([[0.0, 0.03, 0.5, 0.97, 1.0], [0.25, 0.7, 0.1, 0.0, 0.33]], dtype=np.float32)
    ours = T.plddt_rbf(values)
    assert ours.shape == (2, 5, 16) and ours.dtype == np.float32
    ref = rbf(torch.from_numpy(values), 0.0, 1.0, 16).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)  # float32 linspace rounding differs
    assert ours[0, 0, 0] == 1.0 and ours[0, 4, 15] == 1.0  # a value on a centre lights that centre fully


# --- whole-protein encoding ---------------------------------------------------------------------


def test_encode_protein_defaults_match_reference_forward():
    out = T.encode_protein("MKV|GS_")
    n2 = 9
    assert sorted(out) == sorted(
        [
            "sequence_tokens",
            "structure_tokens",
            "ss8_tokens",
            "sasa_tokens",
            "function_tokens",
            "residue_annotation_tokens",
            "average_plddt",
            "per_res_plddt",
            "structure_coords",
            "chain_id",
            "sequence_id",
        ]
    )
    for key, value in out.items():
        assert value.shape[0] == n2, key
    assert out["sequence_tokens"].tolist() == [0, 20, 15, 7, 31, 6, 8, 32, 2]
    # forward: structure all MASK, then BOS/EOS/CHAINBREAK patched in from the sequence track
    assert out["structure_tokens"].tolist() == [4098] + [4096] * 3 + [4100] + [4096] * 3 + [4097]
    assert (out["ss8_tokens"] == 0).all() and (out["sasa_tokens"] == 0).all()
    assert out["function_tokens"].shape == (n2, 8) and (out["function_tokens"] == 0).all()
    assert out["residue_annotation_tokens"].shape == (n2, 16) and (out["residue_annotation_tokens"] == 0).all()
    assert out["structure_coords"].shape == (n2, 3, 3) and np.isnan(out["structure_coords"]).all()
    assert (out["average_plddt"] == 1.0).all() and (out["per_res_plddt"] == 0.0).all()
    assert (out["chain_id"] == 0).all() and (out["sequence_id"] == 0).all()
    for key in ("sequence_tokens", "structure_tokens", "ss8_tokens", "chain_id"):
        assert out[key].dtype == np.int32
    for key in ("average_plddt", "per_res_plddt", "structure_coords"):
        assert out[key].dtype == np.float32


def test_encode_protein_all_tracks():
    coords = RNG.normal(size=(4, 37, 3)).astype(np.float32)
    coords[2] = np.nan  # residue 3 has no atoms
    out = T.encode_protein(
        "ACDE",
        structure_tokens=[1, None, 3, 4095],
        ss8="HHLE",
        sasa=[0.5, 10.0, math.nan, 200.0],
        function_tokens=T.function_tokens_from_lsh(np.ones((4, 8), int), [1, 1, 0, 0], add_special_tokens=False),
        residue_annotations=[[5], None, [], [6, 7]],
        plddt=[0.9, 0.8, 0.7, 0.6],
        coords=coords,
    )
    assert out["structure_tokens"].tolist() == [4098, 1, 4096, 3, 4095, 4097]
    assert T.decode_ss8(out["ss8_tokens"]) == "HHCE"
    assert out["sasa_tokens"].tolist() == [0, 3, 6, 2, 18, 0]
    assert out["function_tokens"][1:3].tolist() == [[5] * 8] * 2 and (out["function_tokens"][3:5] == 3).all()
    assert T.decode_residue_annotations(out["residue_annotation_tokens"]) == [[5], None, [], [6, 7]]
    np.testing.assert_allclose(out["per_res_plddt"], [0, 0.9, 0.8, 0.7, 0.6, 0], rtol=1e-6)
    np.testing.assert_allclose(out["average_plddt"], np.full(6, 0.75), rtol=1e-6)
    assert out["structure_coords"].shape == (6, 3, 3)
    np.testing.assert_array_equal(out["structure_coords"][1], coords[0, :3])
    assert np.isnan(out["structure_coords"][[0, 3, 5]]).all()
    # no pLDDT but coordinates: 1 where the residue has atoms (what ESM3.logits feeds the forward)
    no_plddt = T.encode_protein("ACDE", coords=coords)
    assert no_plddt["per_res_plddt"].tolist() == [0, 1, 1, 0, 1, 0]


def test_encode_protein_per_res_plddt_matches_reference_logits_default():
    _reference()
    import torch

    coords = RNG.normal(size=(5, 37, 3)).astype(np.float32)
    coords[1, :, :] = np.nan
    coords[3, 3:, :] = np.nan  # backbone present, side chain missing
    # The reference pads coordinates with inf at BOS/EOS, then ESM3.logits takes per-residue finiteness.
    padded = torch.nn.functional.pad(torch.from_numpy(coords), (0, 0, 0, 0, 1, 1), value=math.inf)
    ref = padded.isfinite().all(dim=-1).any(dim=-1).float().numpy()
    np.testing.assert_array_equal(T.encode_protein("ACDEF", coords=coords)["per_res_plddt"], ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"structure_tokens": [1, 2]}, r"structure_tokens: length 2 does not match the sequence length 3"),
        ({"ss8": "HHHH"}, r"ss8: length 4 does not match the sequence length 3"),
        ({"sasa": [1.0]}, r"sasa: length 1 does not match the sequence length 3"),
        ({"function_tokens": np.zeros((4, 8), int)}, r"function_tokens: length 4 does not match the sequence length 3"),
        ({"residue_annotations": [[5]]}, r"residue_annotations: length 1 does not match the sequence length 3"),
        ({"plddt": [0.5, 0.5]}, r"plddt: length 2 does not match the sequence length 3"),
        ({"coords": np.zeros((2, 3, 3))}, r"coords: length 2 does not match the sequence length 3"),
        ({"coords": np.zeros((3, 2, 3))}, r"coords: expected shape \(length, atoms >= 3, 3\), got \(3, 2, 3\)"),
        ({"plddt": [0.5, 95.0, 0.5]}, r"plddt: value 95.0 at position 2 is outside \[0, 1\]"),
        ({"plddt": [0.5, math.nan, 0.5]}, r"plddt: value nan at position 2 is outside \[0, 1\]"),
        ({"function_tokens": np.full((3, 8), 300)}, r"function_tokens: token id 300 at position 1, slot 1"),
    ],
)
def test_encode_protein_bad_input(kwargs, match):
    with pytest.raises(T.TokenError, match=match):
        T.encode_protein("ACD", **kwargs)


# --- real data ----------------------------------------------------------------------------------


def test_sidechainnet_records_round_trip():
    if not SIDECHAINNET.exists():
        pytest.skip(f"real data not found at {SIDECHAINNET} (../shared/data is absent)")
    with gzip.open(SIDECHAINNET, "rt") as handle:
        records = [json.loads(line) for line in itertools.islice(handle, 200)]
    assert len(records) == 200
    n_residues = 0
    for record in records:
        seq, dssp = record["seq"], record["dssp8"]
        out = T.encode_protein(seq, ss8=dssp)
        n = len(seq)
        n_residues += n
        assert out["sequence_tokens"].shape == (n + 2,), record["id"]
        assert T.decode_sequence(out["sequence_tokens"]) == seq, record["id"]
        assert T.decode_ss8(out["ss8_tokens"]) == dssp.replace("L", "C"), record["id"]
        assert (out["sequence_tokens"][1:-1] >= 4).all() and (out["ss8_tokens"][1:-1] >= 3).all()
    assert n_residues > 20_000


def test_sidechainnet_records_match_reference():
    if not SIDECHAINNET.exists():
        pytest.skip(f"real data not found at {SIDECHAINNET} (../shared/data is absent)")
    tok = _reference()
    from esm.utils import encoding

    seq_ref, ss_ref = tok.EsmSequenceTokenizer(), tok.SecondaryStructureTokenizer("ss8")
    with gzip.open(SIDECHAINNET, "rt") as handle:
        records = [json.loads(line) for line in itertools.islice(handle, 200)]
    for record in records:
        seq, dssp = record["seq"], record["dssp8"].replace("L", "C")
        assert T.encode_sequence(seq).tolist() == encoding.tokenize_sequence(seq, seq_ref).tolist()
        assert T.encode_ss8(dssp).tolist() == encoding.tokenize_secondary_structure(dssp, ss_ref).tolist()
