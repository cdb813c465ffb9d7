"""Run a function-token decoder checkpoint (`convert --kind function-decoder`): per-residue
function tokens -> keyword and InterPro probabilities, with the label names the checkpoint carries."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.compat.function_decoder_weights import (INTERPRO_FILE, KEYWORDS_FILE, read_interpro_entries,
                                                      read_keyword_vocabulary)
from esm3_jax.compat.params_io import FUNCTION_DECODER_KIND, load_params
from esm3_jax.config import from_dict
from esm3_jax.model.function_decoder import FunctionDecoderConfig, FunctionTokenDecoder

ROWS_PER_CALL = 256  # residues per compiled call: fixed, so any protein length reuses one program


@functools.lru_cache(maxsize=4)
def _jitted(cfg: FunctionDecoderConfig):
    model = FunctionTokenDecoder(cfg)

    def probabilities(variables, tokens_NxD):
        out = model.apply(variables, tokens_NxD)
        return {"keywords": jax.nn.sigmoid(out["keyword_logits"]), "keyword_tfidf": out["keyword_tfidf"],
                "interpro": jax.nn.sigmoid(out["interpro_logits"])}

    return jax.jit(probabilities)


@dataclasses.dataclass(frozen=True)
class FunctionDecoder:
    config: FunctionDecoderConfig
    variables: dict
    keywords: tuple[str, ...]
    interpro_ids: tuple[str, ...]

    @classmethod
    def load(cls, directory: str | Path) -> "FunctionDecoder":
        directory = Path(directory)
        kind, config, variables = load_params(directory)
        if kind != FUNCTION_DECODER_KIND:
            raise ValueError(f"{directory}: a '{kind}' checkpoint, not a {FUNCTION_DECODER_KIND}")
        cfg = from_dict(FunctionDecoderConfig, config, f"{directory} model")
        keywords = read_keyword_vocabulary(directory / KEYWORDS_FILE)
        interpro = read_interpro_entries(directory / INTERPRO_FILE)
        if len(keywords) != cfg.keyword_vocabulary_size or len(interpro) != cfg.num_interpro_classes:
            raise ValueError(f"{directory}: {len(keywords)} keywords and {len(interpro)} InterPro entries listed, the "
                             f"model has {cfg.keyword_vocabulary_size} and {cfg.num_interpro_classes}")
        return cls(cfg, jax.device_put(variables), tuple(keywords), tuple(interpro))

    def probabilities(self, tokens_LxD: np.ndarray) -> dict[str, np.ndarray]:
        """{"keywords": (L, K) and "interpro": (L, I) sigmoid probabilities, "keyword_tfidf": (L, K)
        as regressed}; rows whose tokens are not all LSH ids (pad, motif, unk, none) are 0, as the
        reference's decode leaves them out."""
        tokens_LxD = np.asarray(tokens_LxD, np.int32)
        if tokens_LxD.ndim != 2 or tokens_LxD.shape[1] != self.config.function_token_depth:
            raise ValueError(f"function tokens must be (L, {self.config.function_token_depth}), got {tokens_LxD.shape}")
        L = len(tokens_LxD)
        decodable_L = np.all(tokens_LxD >= T.FUNCTION_LSH_OFFSET, axis=1)
        out = {"keywords": np.zeros((L, self.config.keyword_vocabulary_size), np.float32),
               "keyword_tfidf": np.zeros((L, self.config.keyword_vocabulary_size), np.float32),
               "interpro": np.zeros((L, self.config.num_interpro_classes), np.float32)}
        rows = np.flatnonzero(decodable_L)
        fn = _jitted(self.config)
        for start in range(0, len(rows), ROWS_PER_CALL):
            idx = rows[start : start + ROWS_PER_CALL]
            chunk = np.full((ROWS_PER_CALL, tokens_LxD.shape[1]), T.FUNCTION_LSH_OFFSET, np.int32)
            chunk[: len(idx)] = tokens_LxD[idx]
            got = fn(self.variables, jnp.asarray(chunk))
            for k in out:
                out[k][idx] = np.asarray(got[k])[: len(idx)]
        return out


def merge_positions(positions: list[int] | np.ndarray, merge_gap: int = 3, min_length: int = 5) -> list[tuple[int, int]]:
    """Sorted positions of one label -> (start, end) inclusive ranges: runs joined across gaps of
    up to `merge_gap` positions, then ranges shorter than `min_length` dropped (the reference's
    merge_annotations and annotation_min_length, with its defaults)."""
    ranges: list[list[int]] = []
    for p in sorted(int(p) for p in positions):
        if ranges and ranges[-1][1] + 1 + merge_gap >= p:
            ranges[-1][1] = max(ranges[-1][1], p)
        else:
            ranges.append([p, p])
    return [(a, b) for a, b in ranges if b - a + 1 >= min_length]


def label_ranges(hits: list[tuple[int, str, float]], *, merge_gap: int = 3, min_length: int = 5,
                 first_position: int = 1) -> list[dict]:
    """(position, label, score) hits -> per label its merged ranges, each {start, end, label,
    score} with the mean score over the range's hits; positions count from `first_position`
    (1: residue numbers). Sorted by start, then score descending."""
    by_label: dict[str, dict[int, float]] = {}
    for pos, label, score in hits:
        by_label.setdefault(label, {})[int(pos)] = float(score)
    out = []
    for label, scores in by_label.items():
        for a, b in merge_positions(list(scores), merge_gap, min_length):
            inside = [v for p, v in scores.items() if a <= p <= b]
            out.append({"start": a + first_position, "end": b + first_position, "label": label,
                        "score": float(np.mean(inside))})
    return sorted(out, key=lambda r: (r["start"], -r["score"], r["label"]))


def _hits(probs_LxC: np.ndarray, threshold: float, decodable_L: np.ndarray, names) -> list[tuple[int, str, float]]:
    pos, cls = np.nonzero((probs_LxC >= threshold) & decodable_L[:, None])
    return [(int(p), names[c], float(probs_LxC[p, c])) for p, c in zip(pos, cls)]


def decode_function_tokens(decoder: FunctionDecoder, tokens_LxD: np.ndarray, *, keyword_threshold: float = 0.5,
                           interpro_threshold: float = 0.1, merge_gap: int = 3, min_length: int = 5) -> dict[str, list[dict]]:
    """A protein's (L, 8) function tokens (no BOS/EOS) -> {"keywords": [...], "interpro": [...]}
    ranges over residue numbers 1..L, with the reference decoder's thresholds (keywords
    p >= 0.5, InterPro p >= 0.1) and merging (gaps <= 3 joined, ranges < 5 dropped)."""
    probs = decoder.probabilities(tokens_LxD)
    decodable_L = np.all(np.asarray(tokens_LxD) >= T.FUNCTION_LSH_OFFSET, axis=1)
    ranges = functools.partial(label_ranges, merge_gap=merge_gap, min_length=min_length)
    return {
        "keywords": ranges(_hits(probs["keywords"], keyword_threshold, decodable_L, decoder.keywords)),
        "interpro": ranges(_hits(probs["interpro"], interpro_threshold, decodable_L, decoder.interpro_ids)),
    }
