"""Function tokens: keyword TF-IDF, then locality-sensitive hashing into 8 tokens per residue.

ESM3_SPEC section 6. A residue's function labels (InterPro-style ids and/or free keywords) become one
sparse TF-IDF vector over a keyword vocabulary (sublinear tf, L2 norm; one vector per label id, merged
by element-wise max so that many similar labels do not wash out a rare one). Eight tables of eight
random hyperplanes turn that vector into eight 8-bit values; token = 4 + value. Residues without labels
in an annotated protein get <none> (3) in all eight slots; a protein with no annotations at all gets
<pad> (0), meaning "track absent".

The vocabulary, IDF vector, label -> keywords map and hyperplanes are a `FunctionVocab`. It is either
built from the user's own annotation text (`build_function_vocab`; function_vocab.py is the `build-function-vocab`
verb) or loaded from files in the official release's formats (`load_function_vocab`):

  keywords    text, one term per line         (keyword_vocabulary_safety_filtered_58641.txt)
  idf         .npy float64, shape (K,)          (keyword_idf_safety_filtered_58641.npy)
  labels      csv `interpro_id,keywords`, keywords comma-joined (interpro_29026_to_keywords_58641.csv)
  hyperplanes .npz with keys "0".."7", each (8, K) (hyperplanes_8bit_58641.npz)

Sparse vectors are (indices, values) pairs of numpy arrays: K is ~59k and a label touches tens of
terms, so a dense vector per residue would be pure waste.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import math
import re
import string
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from esm3_jax import tokens as T

# File names `save_function_vocab` writes and `load_function_vocab` reads from a directory. The
# formats are the release's, so a directory of release files works once renamed (or pass paths).
KEYWORDS_FILE = "keyword_vocabulary.txt"
IDF_FILE = "keyword_idf.npy"
LABELS_FILE = "label_to_keywords.csv"
HYPERPLANES_FILE = "hyperplanes.npz"

# Pervasive, function-free terms the release leaves out of its keyword text (same list, so texts
# tokenise to the same terms as the release's vocabulary was built from).
EXCLUDED_TERMS = frozenset(
    {
        "binding domain", "biological_process", "biological process", "biologicalprocess", "c",
        "cellular_component", "cellular component", "cellularcomponent", "cellular_process",
        "cellularprocess", "cellular process", "like domain", "molecular function",
        "molecular_function", "molecularfunction", "n",
    }
)  # fmt: skip

_STRIP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_INTERPRO_ID = re.compile(r"IPR\d+")


class FunctionVocabError(ValueError):
    """A function vocabulary file is missing, malformed, or inconsistent with the others."""


class FunctionLabelError(ValueError):
    """An annotation's label is neither a known label id nor a keyword, or its range is invalid."""


@dataclasses.dataclass(frozen=True)
class FunctionAnnotation:
    """A label over residues start..end, 1-indexed and inclusive (the reference's convention)."""

    label: str
    start: int
    end: int


# --- keyword text ---------------------------------------------------------------------------------


def keywords_from_text(text: str) -> list[str]:
    """Unigrams and bigrams of a description; ", " separates phrases that bigrams must not span.

    Lower-cased, hyphens become spaces, punctuation is stripped, one-letter terms and EXCLUDED_TERMS
    are dropped. Duplicates are kept: they are the term frequencies.
    """
    terms: list[str] = []
    for phrase in text.split(", "):
        words = phrase.replace("-", " ").translate(_STRIP_PUNCTUATION).lower().split()
        terms.extend(words)
        terms.extend(f"{a} {b}" for a, b in zip(words, words[1:]))
    return [t for t in terms if len(t) > 1 and t not in EXCLUDED_TERMS]


# --- the vocabulary -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionVocab:
    keywords: tuple[str, ...]  # K terms; index = TF-IDF dimension
    idf_K: np.ndarray  # (K,) float64
    hyperplanes_TxBxK: np.ndarray  # (tables, bits per table, K) float64, unit rows
    label_keywords: Mapping[str, tuple[str, ...]]  # label id -> its keyword bag (with repeats)
    keyword_index: Mapping[str, int] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        K = len(self.keywords)
        if self.idf_K.shape != (K,):
            raise FunctionVocabError(f"IDF vector has shape {self.idf_K.shape}, vocabulary has {K} terms")
        if self.hyperplanes_TxBxK.ndim != 3 or self.hyperplanes_TxBxK.shape[2] != K:
            raise FunctionVocabError(
                f"hyperplanes have shape {self.hyperplanes_TxBxK.shape}, expected (tables, bits, {K})"
            )
        if self.depth != T.FUNCTION_DEPTH or (1 << self.bits) + T.FUNCTION_LSH_OFFSET != T.FUNCTION_VOCAB_SIZE:
            raise FunctionVocabError(
                f"hyperplanes give {self.depth} tables x {self.bits} bits; ESM3 function tokens need "
                f"{T.FUNCTION_DEPTH} x 8"
            )
        object.__setattr__(self, "keyword_index", {k: i for i, k in enumerate(self.keywords)})

    @property
    def depth(self) -> int:
        return self.hyperplanes_TxBxK.shape[0]

    @property
    def bits(self) -> int:
        return self.hyperplanes_TxBxK.shape[1]


def tfidf(vocab: FunctionVocab, terms: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sparse sublinear-tf TF-IDF vector of a bag of terms, L2-normalised; unknown terms ignored.

    Returns (indices, values), indices ascending. Empty when no term is in the vocabulary.
    """
    counts = collections.Counter(vocab.keyword_index[t] for t in terms if t in vocab.keyword_index)
    idx = np.array(sorted(counts), dtype=np.int64)
    tf = np.array([counts[i] for i in idx], dtype=np.float64)
    val = (1.0 + np.log(tf)) * vocab.idf_K[idx]
    if len(val):
        val /= np.linalg.norm(val)
    return idx, val


def _sparse_max(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]):
    """Element-wise max of two sparse vectors with non-negative values (missing entries are 0)."""
    idx, where = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    val = np.zeros(len(idx))
    np.maximum.at(val, where, np.concatenate([a[1], b[1]]))
    return idx, val


def label_vector(vocab: FunctionVocab, labels: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """The merged TF-IDF vector of one residue's label set (spec 6.3).

    Bare keywords form one bag; each label id contributes the vector of its own keyword bag; all are
    combined by element-wise max.
    """
    keywords: list[str] = []
    ids: list[str] = []
    for label in labels:
        if label in vocab.label_keywords:
            ids.append(label)
        elif label in vocab.keyword_index:
            keywords.append(label)
        else:
            # The release accepts any label *containing* a known InterPro id ("IPR000001 Kringle").
            m = _INTERPRO_ID.search(label)
            if m and m.group() in vocab.label_keywords:
                ids.append(m.group())
            else:
                raise FunctionLabelError(
                    f"function label {label!r} is neither a label id nor a keyword of the vocabulary"
                )
    vec = tfidf(vocab, keywords)
    for label_id in ids:
        vec = _sparse_max(vec, tfidf(vocab, vocab.label_keywords[label_id]))
    return vec


def lsh_values(vocab: FunctionVocab, vec: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(tables,) LSH values in 0..2^bits-1: bit k of table t is [h_tk . v >= 0]."""
    idx, val = vec
    dots_TxB = vocab.hyperplanes_TxBxK[:, :, idx] @ val
    bits_TxB = (dots_TxB >= 0).astype(np.int64)
    return bits_TxB @ (1 << np.arange(vocab.bits, dtype=np.int64))


def hash_labels(vocab: FunctionVocab, labels: Iterable[str]) -> np.ndarray:
    """(depth,) int32 function token ids for one residue's (non-empty) label set.

    All <unk> when none of the labels' keywords is in the vocabulary (an all-zero vector has no
    direction to hash).
    """
    vec = label_vector(vocab, labels)
    if not np.any(vec[1]):
        return np.full(vocab.depth, T.FUNCTION_UNK, np.int32)
    return (lsh_values(vocab, vec) + T.FUNCTION_LSH_OFFSET).astype(np.int32)


@functools.lru_cache(maxsize=1 << 16)
def _hash_label_set(vocab: FunctionVocab, labels: frozenset[str]) -> np.ndarray:
    """hash_labels, memoised across proteins: a corpus reuses a few thousand label sets millions of
    times. (FunctionVocab hashes by identity.)"""
    tokens = hash_labels(vocab, labels)
    tokens.flags.writeable = False
    return tokens


def tokenize_function_annotations(
    vocab: FunctionVocab, annotations: Sequence[FunctionAnnotation], length: int
) -> np.ndarray:
    """(length, depth) int32 function tokens for a protein of `length` residues, no BOS/EOS."""
    if not annotations:
        return np.full((length, vocab.depth), T.FUNCTION_PAD, np.int32)
    for a in annotations:
        if not 1 <= a.start <= a.end <= length:
            raise FunctionLabelError(
                f"function annotation {a.label!r} range [{a.start}, {a.end}] does not fit a protein of "
                f"length {length}"
            )
    out = np.full((length, vocab.depth), T.FUNCTION_NONE, np.int32)
    # The label set is constant between consecutive range boundaries: hash once per run of residues.
    cuts = sorted({0, length} | {a.start - 1 for a in annotations} | {a.end for a in annotations})
    for lo, hi in zip(cuts, cuts[1:]):
        labels = frozenset(a.label for a in annotations if a.start - 1 <= lo and hi <= a.end)
        if labels:
            out[lo:hi] = _hash_label_set(vocab, labels)
    return out


# --- building from text ----------------------------------------------------------------------------


def build_function_vocab(
    label_texts: Mapping[str, Sequence[str]],
    *,
    min_df: int = 1,
    tables: int = T.FUNCTION_DEPTH,
    bits: int = 8,
    seed: int = 0,
) -> FunctionVocab:
    """Vocabulary, IDF and hyperplanes from each label's description texts.

    Each label is one document. Terms in fewer than `min_df` labels are dropped. IDF is sklearn's
    smoothed form, ln((1 + n) / (1 + df)) + 1, which the release's IDF values are consistent with
    (all >= 1). Hyperplanes are standard normal rows scaled to unit length, from `seed`.
    """
    if not label_texts:
        raise FunctionVocabError("no annotation text to build a function vocabulary from")
    bags = {label: keywords_from_text(", ".join(texts)) for label, texts in sorted(label_texts.items())}
    df = collections.Counter(term for bag in bags.values() for term in set(bag))
    keywords = tuple(sorted(term for term, n in df.items() if n >= min_df))
    if not keywords:
        raise FunctionVocabError(f"no keyword occurs in at least {min_df} labels")
    n = len(bags)
    idf_K = np.array([math.log((1 + n) / (1 + df[k])) + 1.0 for k in keywords], dtype=np.float64)
    planes_TxBxK = np.random.default_rng(seed).standard_normal((tables, bits, len(keywords)))
    planes_TxBxK /= np.linalg.norm(planes_TxBxK, axis=-1, keepdims=True)
    kept = set(keywords)
    label_keywords = {label: tuple(t for t in bag if t in kept) for label, bag in bags.items()}
    return FunctionVocab(keywords, idf_K, planes_TxBxK, label_keywords)


# --- files -----------------------------------------------------------------------------------------


def save_function_vocab(vocab: FunctionVocab, out_dir: str | Path) -> Path:
    """Write the four files, in the release's formats, under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / KEYWORDS_FILE).write_text("\n".join(vocab.keywords) + "\n")
    np.save(out / IDF_FILE, vocab.idf_K)
    with open(out / LABELS_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["interpro_id", "keywords"])  # the release's header, whatever the label ids are
        for label, kws in vocab.label_keywords.items():
            w.writerow([label, ",".join(kws)])
    np.savez(out / HYPERPLANES_FILE, **{str(t): vocab.hyperplanes_TxBxK[t] for t in range(vocab.depth)})
    return out


def load_function_vocab(
    keywords_path: str | Path,
    idf_path: str | Path,
    labels_path: str | Path | None,
    hyperplanes_path: str | Path,
) -> FunctionVocab:
    """Read a vocabulary from explicit paths (release files or `save_function_vocab` output)."""
    for p in (keywords_path, idf_path, labels_path, hyperplanes_path):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"function vocabulary file not found: {p}")
    keywords = tuple(Path(keywords_path).read_text().strip().split("\n"))
    try:
        idf_K = np.load(idf_path).astype(np.float64)
    except ValueError as e:
        raise FunctionVocabError(f"{idf_path}: not a .npy array ({e})") from None
    label_keywords: dict[str, tuple[str, ...]] = {}
    if labels_path is not None:
        with open(labels_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != ["interpro_id", "keywords"]:
                raise FunctionVocabError(f"{labels_path}: expected header 'interpro_id,keywords', got {header}")
            for row in reader:
                if len(row) != 2:
                    raise FunctionVocabError(
                        f"{labels_path}: line {reader.line_num} has {len(row)} fields, expected 2"
                    )
                label_keywords[row[0]] = tuple(row[1].split(",")) if row[1] else ()
    try:
        with np.load(hyperplanes_path) as npz:
            tables = sorted(npz.files, key=int)
            if tables != [str(t) for t in range(len(tables))]:
                raise FunctionVocabError(
                    f"{hyperplanes_path}: keys must be '0'..'{len(tables) - 1}', got {npz.files}"
                )
            planes_TxBxK = np.stack([npz[t] for t in tables]).astype(np.float64)
    except (ValueError, OSError) as e:
        if isinstance(e, FunctionVocabError):
            raise
        raise FunctionVocabError(f"{hyperplanes_path}: not a hyperplane .npz ({e})") from None
    try:
        return FunctionVocab(keywords, idf_K, planes_TxBxK, label_keywords)
    except FunctionVocabError as e:
        raise FunctionVocabError(f"{keywords_path}: {e}") from None


# The release's file names (esm/data and the weights repository), matched when ours are absent.
_RELEASE_PATTERNS = {
    KEYWORDS_FILE: "keyword_vocabulary*.txt",
    IDF_FILE: "keyword_idf*.npy",
    LABELS_FILE: "interpro_*_to_keywords_*.csv",
    HYPERPLANES_FILE: "hyperplanes_8bit_*.npz",
}


def _vocab_file(d: Path, name: str) -> Path:
    if (d / name).is_file():
        return d / name
    matches = sorted(d.glob(_RELEASE_PATTERNS[name]))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"{d}: no {name} (nor a release file {_RELEASE_PATTERNS[name]})")
    raise FunctionVocabError(f"{d}: several files match {_RELEASE_PATTERNS[name]}: {[m.name for m in matches]}")


def load_function_vocab_dir(vocab_dir: str | Path) -> FunctionVocab:
    """A folder of `save_function_vocab` files, or of the release's files under their own names
    (keyword_vocabulary_safety_filtered_58641.txt, keyword_idf_..., interpro_29026_to_keywords_58641.csv,
    hyperplanes_8bit_58641.npz)."""
    d = Path(vocab_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"function vocabulary directory not found: {d}")
    names = (KEYWORDS_FILE, IDF_FILE, LABELS_FILE, HYPERPLANES_FILE)
    return load_function_vocab(*(_vocab_file(d, name) for name in names))


# --- decoding: function tokens -> the vocabulary's labels and keywords ------------------------------


@dataclasses.dataclass(frozen=True)
class Signatures:
    """The LSH signature (tables x bits, 0/1) of every label and every keyword of a vocabulary:
    what a residue annotated with exactly that label (or bare keyword) is tokenized to."""

    names: tuple[str, ...]
    is_label: np.ndarray  # (C,) bool: a label id (else a keyword)
    bits_CxS: np.ndarray  # (C, tables * bits) uint8


@functools.lru_cache(maxsize=4)
def vocab_signatures(vocab: FunctionVocab) -> Signatures:
    names, rows, is_label = [], [], []
    for label in vocab.label_keywords:
        vec = label_vector(vocab, [label])
        if np.any(vec[1]):  # a label none of whose keywords survived min_df has no direction
            names.append(label)
            rows.append(lsh_values(vocab, vec))
            is_label.append(True)
    # A bare keyword's vector is its own axis: bit b of table t is [h_tbk >= 0].
    keyword_bits_KxTxB = np.moveaxis(vocab.hyperplanes_TxBxK >= 0, -1, 0)
    bits = [((np.asarray(rows)[..., None] >> np.arange(vocab.bits)) & 1).astype(np.uint8).reshape(len(rows), -1)
            if rows else np.zeros((0, vocab.depth * vocab.bits), np.uint8),
            keyword_bits_KxTxB.astype(np.uint8).reshape(len(vocab.keywords), -1)]
    return Signatures(tuple(names) + vocab.keywords, np.array(is_label + [False] * len(vocab.keywords)),
                      np.concatenate(bits))


def token_bits(tokens_LxD: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """((L, D * bits) uint8 LSH bits, (L,) bool: the row is all LSH ids) of function tokens."""
    tokens_LxD = np.asarray(tokens_LxD, np.int64)
    has_L = np.all(tokens_LxD >= T.FUNCTION_LSH_OFFSET, axis=1)
    values = np.where(has_L[:, None], tokens_LxD - T.FUNCTION_LSH_OFFSET, 0)
    return ((values[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(len(values), -1), has_L


def nearest_function_labels(
    vocab: FunctionVocab, tokens_LxD: np.ndarray, max_hamming: int = 10
) -> tuple[list[tuple[int, str, int]], np.ndarray]:
    """([(position, name, Hamming distance)], (L,) nearest distance, -1 where not all LSH ids).

    The list has, for every residue whose tokens are LSH ids, the label(s) or keyword(s) of
    `vocab` whose signature is nearest to the residue's 64 bits, all of those tied at the
    minimum, when that minimum is <= `max_hamming`. Positions count from 0.

    Random 64-bit signatures lie 32 +- 4 bits apart and the nearest of ~10^5 random ones ~14
    bits away, so a distance <= 10 is a real match (the residue's TF-IDF vector within ~30
    degrees of the label's: the LSH angle estimate is pi * d / 64)."""
    sig = vocab_signatures(vocab)
    pos_bits, has_L = token_bits(tokens_LxD, vocab.bits)
    out: list[tuple[int, str, int]] = []
    nearest_L = np.full(len(pos_bits), -1, np.int64)
    cand = sig.bits_CxS.astype(np.float32)
    for start in range(0, len(pos_bits), 256):
        p = pos_bits[start : start + 256].astype(np.float32)
        # Hamming = |p| + |c| - 2 p.c, as one matmul.
        dist_PxC = p.sum(1, keepdims=True) + cand.sum(1)[None, :] - 2.0 * (p @ cand.T)
        best_P = dist_PxC.min(axis=1)
        for i, best in enumerate(best_P):
            pos = start + i
            if not has_L[pos]:
                continue
            nearest_L[pos] = int(round(best))
            if best <= max_hamming:
                out.extend((pos, sig.names[c], int(round(best))) for c in np.flatnonzero(dist_PxC[i] == best))
    return out, nearest_L


def label_top_keywords(vocab: FunctionVocab, name: str, k: int = 5) -> list[str]:
    """A label's k keywords of largest TF-IDF weight ([name] itself for a bare keyword)."""
    if name not in vocab.label_keywords:
        return [name]
    idx, val = tfidf(vocab, vocab.label_keywords[name])
    order = np.argsort(-val, kind="stable")[:k]
    return [vocab.keywords[idx[j]] for j in order]
