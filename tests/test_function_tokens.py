"""Function tokens (ESM3_SPEC 6): TF-IDF + LSH, parity with the reference, behaviour on real SCOPe text."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from esm3_jax import cli
from esm3_jax import tokens as T
from esm3_jax.data import function_tokens as ft
from esm3_jax.data import sources as src
from tests.paths import DATA

SCOPE_DES = DATA / "annotations" / "scope" / "scope_2.07_dir.des.txt.gz"


def _release_dir() -> Path:
    """The official release's keyword vocabulary, IDF and InterPro map (shipped in the `esm` package)."""
    esm = pytest.importorskip("esm", reason="the reference `esm` package is not installed")
    d = Path(esm.__file__).parent / "data"
    if not (d / "keyword_vocabulary_safety_filtered_58641.txt").is_file():
        pytest.skip(f"{d} lacks the release's function vocabulary files")
    return d


@pytest.fixture(scope="module")
def scope_texts() -> dict[str, list[str]]:
    if not SCOPE_DES.is_file():
        pytest.skip(f"{SCOPE_DES} not found (../shared/data absent)")
    return src.scope_label_texts(src.read_scope_des(SCOPE_DES, src.SCOPE_NAME_LEVELS))


@pytest.fixture(scope="module")
def scope_vocab(scope_texts) -> ft.FunctionVocab:
    return ft.build_function_vocab(scope_texts, seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release's files plus hyperplanes of the release's shape (8 x (8, 58641)) written in its
    .npz format; the release's own hyperplanes ship with the model weights, not the package."""
    d = _release_dir()
    keywords = d / "keyword_vocabulary_safety_filtered_58641.txt"
    K = len(keywords.read_text().strip().split("\n"))
    planes = np.random.default_rng(7).standard_normal((8, 8, K))
    planes /= np.linalg.norm(planes, axis=-1, keepdims=True)
    hp = tmp_path_factory.mktemp("release") / "hyperplanes_8bit_58641.npz"
    np.savez(hp, **{str(t): planes[t] for t in range(8)})
    paths = dict(
        keywords=keywords,
        idf=d / "keyword_idf_safety_filtered_58641.npy",
        labels=d / "interpro_29026_to_keywords_58641.csv",
        entries=d / "entry_list_safety_29026.list",
        hyperplanes=hp,
    )
    vocab = ft.load_function_vocab(paths["keywords"], paths["idf"], paths["labels"], paths["hyperplanes"])
    return paths, vocab


def test_keywords_match_reference_text_processing(scope_texts):
    pytest.importorskip("esm", reason="the reference `esm` package is not installed")
    from esm.tokenization import function_tokenizer as ref

    texts = [t for ts in itertools.islice(scope_texts.values(), 300) for t in ts]
    texts += ["ATP-binding, P-loop containing nucleoside triphosphate hydrolase", "Zn(2+) binding domain, C-terminal"]
    for text in texts:
        assert ft.keywords_from_text(text) == ref._keywords_from_text(text), text


def test_release_vocab_parity_with_reference_tfidf_and_lsh(release):
    """Same vocabulary, IDF and hyperplanes: our TF-IDF vectors and LSH values equal the reference's."""
    from esm.utils.function import lsh as ref_lsh
    from esm.utils.function import tfidf as ref_tfidf

    paths, vocab = release
    ref_model = ref_tfidf.TFIDFModel(paths["keywords"], paths["idf"])
    ref_hash = ref_lsh.LSHTokenized(8, len(vocab.keywords), num_tables=8, filepath=paths["hyperplanes"])
    labels = sorted(vocab.label_keywords)
    rng = random.Random(0)
    for label in rng.sample(labels, 200):
        terms = list(vocab.label_keywords[label])
        idx, val = ft.tfidf(vocab, terms)
        ref_vec = ref_model.encode(terms)
        dense = np.zeros(len(vocab.keywords))
        dense[idx] = val
        np.testing.assert_allclose(dense, ref_vec.toarray()[0], rtol=1e-12, atol=1e-15)
        if len(idx):
            np.testing.assert_array_equal(ft.lsh_values(vocab, (idx, val)), ref_hash(ref_vec)[0])


def test_release_files_load_from_a_folder_by_their_own_names(release, tmp_path):
    paths, vocab = release
    folder = tmp_path / "release"
    folder.mkdir()
    for key in ("keywords", "idf", "labels", "hyperplanes"):
        (folder / paths[key].name).symlink_to(paths[key])
    back = ft.load_function_vocab_dir(folder)
    assert back.keywords == vocab.keywords and len(back.label_keywords) == 29026
    np.testing.assert_array_equal(ft.hash_labels(back, ["IPR000001"]), ft.hash_labels(vocab, ["IPR000001"]))


def test_release_vocab_parity_with_reference_tokenizer(release):
    """Whole proteins through the reference InterProQuantizedTokenizer and through ours."""
    from esm.tokenization.function_tokenizer import InterProQuantizedTokenizer
    from esm.utils.types import FunctionAnnotation as RefAnnotation

    paths, vocab = release
    ref = InterProQuantizedTokenizer(
        lsh_path=paths["hyperplanes"],
        keyword_vocabulary_path=paths["keywords"],
        keyword_idf_path=paths["idf"],
        interpro_entry_path=paths["entries"],
        interpro2keywords_path=paths["labels"],
    )
    labels = sorted(vocab.label_keywords)
    rng = random.Random(1)
    for _ in range(20):
        L = rng.randint(20, 300)
        annotations = []
        for _ in range(rng.randint(1, 6)):
            start = rng.randint(1, L)
            end = rng.randint(start, min(L, start + 120))
            label = rng.choice(labels) if rng.random() < 0.7 else rng.choice(vocab.keywords)
            annotations.append(ft.FunctionAnnotation(label, start, end))
        ours = ft.tokenize_function_annotations(vocab, annotations, L)
        theirs = ref.encode(
            ref.tokenize([RefAnnotation(a.label, a.start, a.end) for a in annotations], L), add_special_tokens=False
        ).numpy()
        np.testing.assert_array_equal(ours, theirs)
        assert ours.shape == (L, T.FUNCTION_DEPTH) and ours.dtype == np.int32


def test_track_layout_pad_none_unk(scope_vocab):
    fam = "a.1.1.2"
    # No annotation at all: the whole track is absent (pad).
    assert (ft.tokenize_function_annotations(scope_vocab, [], 5) == T.FUNCTION_PAD).all()
    toks = ft.tokenize_function_annotations(scope_vocab, [ft.FunctionAnnotation(fam, 2, 3)], 5)
    # Uncovered residues of an annotated protein: <none> in all 8 slots.
    assert (toks[[0, 3, 4]] == T.FUNCTION_NONE).all()
    assert (toks[1:3] >= T.FUNCTION_LSH_OFFSET).all() and (toks[1] == toks[2]).all()
    # A label whose keywords are all outside the vocabulary has no vector: <unk>.
    empty = ft.FunctionVocab(
        scope_vocab.keywords, scope_vocab.idf_K, scope_vocab.hyperplanes_TxBxK, {"bare": ("not a keyword",)}
    )
    assert (ft.tokenize_function_annotations(empty, [ft.FunctionAnnotation("bare", 1, 2)], 2) == T.FUNCTION_UNK).all()


def test_identical_label_sets_hash_identically(scope_vocab):
    a, b = "a.1.1.2", "b.1.1.1"
    one = ft.tokenize_function_annotations(
        scope_vocab, [ft.FunctionAnnotation(a, 1, 10), ft.FunctionAnnotation(b, 5, 10)], 10
    )
    # Another protein, labels listed the other way round and over other ranges.
    two = ft.tokenize_function_annotations(
        scope_vocab, [ft.FunctionAnnotation(b, 1, 40), ft.FunctionAnnotation(a, 30, 40)], 40
    )
    # Residues 5..10 of the first and 30..40 of the second both carry {a, b}.
    assert (one[4:] == one[4]).all() and (two[29:] == two[29]).all()
    np.testing.assert_array_equal(one[4], two[29])
    np.testing.assert_array_equal(one[0], ft.hash_labels(scope_vocab, [a]))
    np.testing.assert_array_equal(two[0], ft.hash_labels(scope_vocab, [b]))
    assert not np.array_equal(one[0], two[0]) and not np.array_equal(one[0], one[4])


def _shared_bits(t1: np.ndarray, t2: np.ndarray) -> int:
    v1 = (t1 - T.FUNCTION_LSH_OFFSET).astype(np.uint8)
    v2 = (t2 - T.FUNCTION_LSH_OFFSET).astype(np.uint8)
    return int(64 - np.unpackbits(v1 ^ v2).sum())


def test_similar_scope_families_share_more_lsh_bits(scope_vocab, scope_texts):
    """On real SCOPe text: two families of one superfamily (shared class, fold and superfamily names)
    agree on more of the 64 LSH bits than two families of different classes."""
    rng = random.Random(0)
    families = sorted(scope_texts)
    by_sf: dict[str, list[str]] = {}
    for fam in families:
        by_sf.setdefault(fam.rsplit(".", 1)[0], []).append(fam)
    multi = [fs for fs in by_sf.values() if len(fs) >= 2]
    same_sf, other_class = [], []
    for _ in range(400):
        f1, f2 = rng.sample(rng.choice(multi), 2)
        same_sf.append(_shared_bits(ft.hash_labels(scope_vocab, [f1]), ft.hash_labels(scope_vocab, [f2])))
        g1, g2 = rng.sample(families, 2)
        while g1[0] == g2[0]:
            g1, g2 = rng.sample(families, 2)
        other_class.append(_shared_bits(ft.hash_labels(scope_vocab, [g1]), ft.hash_labels(scope_vocab, [g2])))
    same, other = float(np.mean(same_sf)), float(np.mean(other_class))
    print(f"shared LSH bits of 64: same superfamily {same:.1f}, different class {other:.1f}")
    # Unrelated texts are near-orthogonal, so about half the bits agree by chance.
    assert 26 <= other <= 38
    assert same >= other + 10


def test_unknown_label_and_bad_range_raise(scope_vocab):
    with pytest.raises(ft.FunctionLabelError, match="neither a label id nor a keyword"):
        ft.tokenize_function_annotations(scope_vocab, [ft.FunctionAnnotation("no such label", 1, 2)], 3)
    with pytest.raises(ft.FunctionLabelError, match="does not fit"):
        ft.tokenize_function_annotations(scope_vocab, [ft.FunctionAnnotation("a.1.1.2", 2, 4)], 3)


def test_save_load_round_trip_and_reference_reads_our_files(tmp_path, scope_vocab):
    out = ft.save_function_vocab(scope_vocab, tmp_path / "vocab")
    back = ft.load_function_vocab_dir(out)
    assert back.keywords == scope_vocab.keywords
    np.testing.assert_array_equal(back.idf_K, scope_vocab.idf_K)
    np.testing.assert_array_equal(back.hyperplanes_TxBxK, scope_vocab.hyperplanes_TxBxK)
    assert dict(back.label_keywords) == dict(scope_vocab.label_keywords)
    # Our files are in the release's formats: the reference loads them and hashes identically.
    pytest.importorskip("esm", reason="the reference `esm` package is not installed")
    from esm.utils.function import lsh as ref_lsh
    from esm.utils.function import tfidf as ref_tfidf

    ref_model = ref_tfidf.TFIDFModel(out / ft.KEYWORDS_FILE, out / ft.IDF_FILE)
    ref_hash = ref_lsh.LSHTokenized(8, len(back.keywords), num_tables=8, filepath=out / ft.HYPERPLANES_FILE)
    for label in ["a.1.1.2", "b.1.1.1", "d.58.7.1"]:
        vec = ref_model.encode(list(back.label_keywords[label]))
        np.testing.assert_array_equal(ft.hash_labels(back, [label]) - T.FUNCTION_LSH_OFFSET, ref_hash(vec)[0])


def test_malformed_vocab_files_fail_clearly(tmp_path, scope_vocab):
    out = ft.save_function_vocab(scope_vocab, tmp_path / "vocab")
    np.save(out / ft.IDF_FILE, scope_vocab.idf_K[:-1])
    with pytest.raises(ft.FunctionVocabError, match="IDF vector has shape"):
        ft.load_function_vocab_dir(out)
    ft.save_function_vocab(scope_vocab, out)
    (out / ft.LABELS_FILE).write_text("id,words\nx,y\n")
    with pytest.raises(ft.FunctionVocabError, match="expected header"):
        ft.load_function_vocab_dir(out)
    with pytest.raises(FileNotFoundError, match="not found"):
        ft.load_function_vocab_dir(tmp_path / "missing")


def test_build_function_vocab_cli(tmp_path, capsys):
    text = tmp_path / "labels.tsv"
    text.write_text(
        "kinase\tProtein kinase domain, ATP binding\n"
        "kinase\tSerine/threonine-protein kinase\n"
        "globin\tGlobin-like, oxygen transport\n"
        "# a comment\n"
        "protease\tTrypsin-like serine protease\n"
    )
    assert cli.main(["build-function-vocab", str(tmp_path / "v"), "--label-text", str(text), "--seed", "3"]) == 0
    vocab = ft.load_function_vocab_dir(tmp_path / "v")
    assert set(vocab.label_keywords) == {"kinase", "globin", "protease"}
    assert "protein kinase" in vocab.keywords and "serine" in vocab.keywords
    # "like" is in 2 of 3 labels (globin-like, trypsin-like), "oxygen" in 1: rarer terms weigh more.
    i = vocab.keyword_index
    assert vocab.idf_K[i["oxygen"]] > vocab.idf_K[i["like"]]
    assert "3 labels" in capsys.readouterr().out
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    assert cli.main(["build-function-vocab", str(tmp_path / "w"), "--label-text", str(bad)]) == 2
    assert "expected `label<TAB>description text`" in capsys.readouterr().err
