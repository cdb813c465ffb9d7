"""Structure tokenizer API: load an encoder or decoder checkpoint, turn chains into tokens and
tokens into backbones (all heavy atoms for an all-atom decoder); plus the converters between the official PyTorch state dicts
(`esm3_structure_encoder_v0.pth`, `esm3_structure_decoder_v0.pth`) and esm3-jax checkpoints.

Checkpoint kinds (params_io): "structure-encoder" stores {"params", "codebook"} (the codebook is
EMA state, not parameters), "structure-decoder" stores {"params"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.config import from_dict, to_dict
from esm3_jax.convert import LINEAR, SAME, Row, block_rows, kernel, kernel_in, reshaped
from esm3_jax.model.vqvae import DecoderConfig, EncoderConfig, StructureDecoder, StructureEncoder, aa_indices
from esm3_jax.params_io import load_params

Array = np.ndarray
ENCODER_KIND, DECODER_KIND = "structure-encoder", "structure-decoder"


# --- conversion tables ----------------------------------------------------------------------------


def encoder_rows(cfg: EncoderConfig) -> list[Row]:
    d, vh, hid = cfg.d_model, cfg.v_heads, cfg.ffn_hidden
    rows: list[Row] = [
        ("relative_positional_embedding.embedding.weight", ("params", "relpos_embed"), SAME),
        ("pre_vq_proj.weight", ("params", "pre_vq_proj"), LINEAR),
        ("pre_vq_proj.bias", ("params", "pre_vq_proj_bias"), SAME),
        ("codebook.embeddings", ("codebook", "codebook", "embeddings"), SAME),
        ("codebook.N", ("codebook", "codebook", "cluster_size"), SAME),
        ("codebook.z_avg", ("codebook", "codebook", "embed_sum"), SAME),
    ]
    for i in range(cfg.n_layers):
        t, f = f"transformer.blocks.{i}", ("params", f"block_{i}")
        g, n = f + ("geom_attn",), f + ("ffn",)
        rows += [
            (f"{t}.geom_attn.s_norm.weight", g + ("norm", "scale"), SAME),
            (f"{t}.geom_attn.s_norm.bias", g + ("norm", "bias"), SAME),
            (f"{t}.geom_attn.proj.weight", g + ("proj",), kernel(d, (5, vh, 3))),
            (f"{t}.geom_attn.proj.bias", g + ("proj_bias",), reshaped((5, vh, 3))),
            (f"{t}.geom_attn.out_proj.weight", g + ("out",), kernel_in((vh, 3), d)),
            (f"{t}.geom_attn.out_proj.bias", g + ("out_bias",), SAME),
            (f"{t}.geom_attn.distance_scale_per_head", g + ("distance_scale",), SAME),
            (f"{t}.geom_attn.rotation_scale_per_head", g + ("rotation_scale",), SAME),
            (f"{t}.ffn.0.weight", n + ("norm", "scale"), SAME),
            (f"{t}.ffn.0.bias", n + ("norm", "bias"), SAME),
            (f"{t}.ffn.1.weight", n + ("up",), kernel(d, (2, hid))),
            (f"{t}.ffn.1.bias", n + ("up_bias",), reshaped((2, hid))),
            (f"{t}.ffn.3.weight", n + ("down",), LINEAR),
            (f"{t}.ffn.3.bias", n + ("down_bias",), SAME),
        ]
    return rows


def _head_rows(t: str, f: tuple[str, ...], names=("dense", "norm", "output")) -> list[Row]:
    dense, norm, out = names
    return [
        (f"{t}.{dense}.weight", f + ("dense",), LINEAR),
        (f"{t}.{dense}.bias", f + ("dense_bias",), SAME),
        (f"{t}.{norm}.weight", f + ("norm", "scale"), SAME),
        (f"{t}.{norm}.bias", f + ("norm", "bias"), SAME),
        (f"{t}.{out}.weight", f + ("out",), LINEAR),
        (f"{t}.{out}.bias", f + ("out_bias",), SAME),
    ]


def decoder_rows(cfg: DecoderConfig) -> tuple[list[Row], list[list[Row]]]:
    """(rows for unstacked tensors, per-layer rows of the scanned trunk (empty if unscanned))."""
    p = ("params",)
    rows: list[Row] = [
        ("embed.weight", p + ("token_embed",), SAME),
        ("decoder_stack.norm.weight", p + ("final_norm", "scale"), SAME),
        ("pairwise_classification_head.downproject.weight", p + ("pairwise_head", "down"), LINEAR),
        ("pairwise_classification_head.linear1.weight", p + ("pairwise_head", "pair_in"), LINEAR),
        ("pairwise_classification_head.norm.weight", p + ("pairwise_head", "norm", "scale"), SAME),
        ("pairwise_classification_head.norm.bias", p + ("pairwise_head", "norm", "bias"), SAME),
        ("pairwise_classification_head.linear2.weight", p + ("pairwise_head", "pair_out"), LINEAR),
    ]
    rows += _head_rows("affine_output_projection", p + ("frame_head", "mlp"), ("ffn1", "norm", "proj"))
    rows += _head_rows("plddt_head", p + ("plddt_head",))
    # Heads of the paper's training recipe that the released decoder does not have.
    if cfg.inverse_folding_head:
        rows += _head_rows("sequence_head", p + ("sequence_head",))
    if cfg.sequence_conditioning:
        rows += [("sequence_embed.weight", p + ("sequence_embed",), SAME)]
    tcfg = cfg.trunk_config()
    stacked: list[list[Row]] = []
    for j in range(cfg.n_layers):
        t = f"decoder_stack.blocks.{j}"
        if cfg.scan_layers:
            stacked.append(block_rows(t, p + ("trunk", "blocks", "block"), tcfg, False))
        else:
            rows += block_rows(t, p + ("trunk", f"block_{j}"), tcfg, False)
    return rows, stacked


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def state_to_variables(state: dict[str, Array], rows: list[Row], stacked: list[list[Row]], what: str) -> dict:
    """A flax variables tree from a state dict through a row table; strict on both sides."""
    expected = {r[0] for r in rows} | {r[0] for layer in stacked for r in layer}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out: dict = {}
    for key, path, layout in rows:
        _set(out, path, np.asarray(layout.to_flax(np.asarray(state[key], np.float32))))
    for i, (_, path, layout) in enumerate(stacked[0] if stacked else []):
        _set(out, path, np.stack([layout.to_flax(np.asarray(state[layer[i][0]], np.float32)) for layer in stacked]))
    return out


def variables_to_state(variables: dict, rows: list[Row], stacked: list[list[Row]]) -> dict[str, Array]:
    out = {key: np.ascontiguousarray(layout.to_torch(np.asarray(_get(variables, path)))) for key, path, layout in rows}
    for j, layer in enumerate(stacked):
        for key, path, layout in layer:
            out[key] = np.ascontiguousarray(layout.to_torch(np.asarray(_get(variables, path))[j]))
    return out


def infer_encoder_config(state: dict[str, Array], **overrides: Any) -> EncoderConfig:
    """Encoder shape from its tensors (every size is visible in some shape)."""
    key = "relative_positional_embedding.embedding.weight"
    if key not in state:
        raise ValueError(f"not a structure-encoder state dict: no '{key}'")
    rel_rows, d = state[key].shape
    n_layers = len({int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))})
    n_codes, d_out = state["codebook.embeddings"].shape
    hidden = state["transformer.blocks.0.ffn.3.weight"].shape[1]
    raw = dict(
        d_model=int(d), n_layers=n_layers, d_out=int(d_out), n_codes=int(n_codes), relpos_bins=(int(rel_rows) - 2) // 2,
        v_heads=int(state["transformer.blocks.0.geom_attn.distance_scale_per_head"].shape[0]),
        ffn_expansion=float(hidden) / float(d),
    )
    raw.update(overrides)
    cfg = from_dict(EncoderConfig, raw, "converted encoder")
    if cfg.ffn_hidden != hidden:
        raise ValueError(f"FFN hidden size {hidden} is not a multiple of 256 for d_model={d}")
    cfg.validate()
    return cfg


def infer_decoder_config(state: dict[str, Array], n_heads: int, **overrides: Any) -> DecoderConfig:
    """Decoder shape from its tensors; the head count is not visible in any shape."""
    if "embed.weight" not in state:
        raise ValueError("not a structure-decoder state dict: no 'embed.weight'")
    d = int(state["embed.weight"].shape[1])
    n_layers = len({int(m.group(1)) for k in state if (m := re.match(r"decoder_stack\.blocks\.(\d+)\.", k))})
    raw = dict(
        d_model=d, n_heads=n_heads, n_layers=n_layers,
        inverse_folding_head="sequence_head.dense.weight" in state,
        sequence_conditioning="sequence_embed.weight" in state,
    )
    raw.update(overrides)
    cfg = from_dict(DecoderConfig, raw, "converted decoder")
    cfg.validate()
    return cfg


def encoder_from_torch(state: dict[str, Array], **overrides: Any) -> tuple[EncoderConfig, dict]:
    cfg = infer_encoder_config(state, **overrides)
    return cfg, state_to_variables(state, encoder_rows(cfg), [], f"a structure encoder of {cfg}")


def decoder_from_torch(state: dict[str, Array], n_heads: int, **overrides: Any) -> tuple[DecoderConfig, dict]:
    cfg = infer_decoder_config(state, n_heads, **overrides)
    rows, stacked = decoder_rows(cfg)
    return cfg, state_to_variables(state, rows, stacked, f"a structure decoder of {cfg}")


# `esm3-jax convert --kind structure-encoder|structure-decoder` (registered in convert.KINDS).
def encoder_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict]:
    cfg, variables = encoder_from_torch(state)
    return variables, to_dict(cfg)


def encoder_export(variables: dict, config: dict) -> dict[str, Array]:
    return variables_to_state(variables, encoder_rows(from_dict(EncoderConfig, config, "encoder")), [])


def decoder_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict]:
    if getattr(args, "n_heads", None) is None:
        raise ValueError("--n-heads is required for --kind structure-decoder (20 for esm3_structure_decoder_v0)")
    cfg, variables = decoder_from_torch(state, args.n_heads)
    return variables, to_dict(cfg)


def decoder_export(variables: dict, config: dict) -> dict[str, Array]:
    rows, stacked = decoder_rows(from_dict(DecoderConfig, config, "decoder"))
    return variables_to_state(variables, rows, stacked)


# --- tokenizer API ------------------------------------------------------------------------------

LENGTH_BUCKET = 64  # inputs are padded to a multiple of this, so few lengths get compiled


def _bucket(n: int) -> int:
    return max(LENGTH_BUCKET, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)


def load_encoder(directory: str | Path) -> tuple[EncoderConfig, dict]:
    kind, config, variables = load_params(directory)
    if kind != ENCODER_KIND:
        raise ValueError(f"{directory}: a '{kind}' checkpoint, not a {ENCODER_KIND}")
    return from_dict(EncoderConfig, config, f"{directory} model"), variables


def load_decoder(directory: str | Path) -> tuple[DecoderConfig, dict]:
    kind, config, variables = load_params(directory)
    if kind != DECODER_KIND:
        raise ValueError(f"{directory}: a '{kind}' checkpoint, not a {DECODER_KIND}")
    return from_dict(DecoderConfig, config, f"{directory} model"), variables


# One compiled function per model shape, shared by every tokenizer of that shape (the weights
# are arguments), so reloading a checkpoint does not recompile.
@functools.lru_cache(maxsize=8)
def _jitted_encoder(cfg: EncoderConfig):
    model = StructureEncoder(cfg)
    return jax.jit(lambda v, c, r, m: model.apply(v, c, r, None, m, method=StructureEncoder.encode))


@functools.lru_cache(maxsize=8)
def _jitted_decoder(cfg: DecoderConfig):
    model = StructureDecoder(cfg)
    return jax.jit(lambda v, t, s: model.apply(v, t, sequence_BxL=s))


@dataclasses.dataclass(frozen=True)
class StructureTokenizer:
    """Chains -> tokens (encoder) and tokens -> backbones (decoder); either half may be absent."""

    encoder_config: EncoderConfig | None = None
    encoder_variables: dict | None = None
    decoder_config: DecoderConfig | None = None
    decoder_variables: dict | None = None

    @classmethod
    def load(cls, encoder_dir: str | Path | None = None, decoder_dir: str | Path | None = None) -> "StructureTokenizer":
        enc = load_encoder(encoder_dir) if encoder_dir else (None, None)
        dec = load_decoder(decoder_dir) if decoder_dir else (None, None)
        return cls(*enc, *dec)

    @property
    def _encode_fn(self):
        return _jitted_encoder(self.encoder_config)

    @property
    def _decode_fn(self):
        return _jitted_decoder(self.decoder_config)

    def tokenize(self, backbone_Lx3x3: np.ndarray, residue_index_L: np.ndarray | None = None) -> np.ndarray:
        """(L,) int32 codes; -1 where the residue has no complete N/CA/C backbone.

        NaN, infinite or absurd (>= 1e6 Å) coordinates mark a residue as missing, as the model's
        frame mask does. Raises ValueError when no residue has a backbone.
        """
        if self.encoder_config is None:
            raise ValueError("no encoder loaded")
        bb = np.asarray(backbone_Lx3x3, np.float32)
        if bb.ndim != 3 or bb.shape[1:] != (3, 3):
            raise ValueError(f"backbone must be (L, 3, 3) N/CA/C coordinates, got shape {bb.shape}")
        L = bb.shape[0]
        with np.errstate(invalid="ignore"):
            has = (np.isfinite(bb) & (np.abs(bb) < 1e6)).all((-1, -2))
        if not has.any():
            raise ValueError(f"none of the {L} residues has finite N, CA and C coordinates")
        P = _bucket(L)
        coords = np.full((1, P, 3, 3), np.nan, np.float32)
        coords[0, :L] = np.where(has[:, None, None], bb, np.nan)
        res = np.zeros((1, P), np.int32)
        res[0, :L] = np.arange(L) if residue_index_L is None else residue_index_L
        valid = np.zeros((1, P), bool)
        valid[0, :L] = True
        out = self._encode_fn(self.encoder_variables, coords, res, valid)
        tokens = np.asarray(out["tokens"])[0, :L]
        return np.where(has, tokens, -1).astype(np.int32)

    def decode(self, tokens_L: np.ndarray, sequence: str | None = None) -> dict[str, Any]:
        """backbone (L, 3, 3), plddt (L,) in [0, 1], pae (L, L) in Å, ptm: from per-residue codes
        (-1 = unknown, decoded as MASK); an all-atom decoder adds atom37 (L, 37, 3), NaN in the
        slots the residue type lacks."""
        if self.decoder_config is None:
            raise ValueError("no decoder loaded")
        framed = T.encode_structure_tokens(tokens_L)  # validates the ids; adds BOS/EOS
        L = len(framed) - 2
        P = _bucket(L + 2)
        toks = np.full((1, P), T.STRUCTURE_PAD, np.int32)
        toks[0, : L + 2] = framed
        seq = None
        if self.decoder_config.sequence_conditioning:
            if sequence is None or len(sequence) != L:
                raise ValueError(f"this decoder needs the {L}-residue amino-acid sequence")
            seq = np.full((1, P), 20, np.int32)
            seq[0, 1 : L + 1] = aa_indices(sequence)
        out = self._decode_fn(self.decoder_variables, toks, seq)
        result = {
            "backbone": np.asarray(out["backbone"])[0, 1 : L + 1],
            "plddt": np.asarray(out["plddt"])[0, 1 : L + 1],
            "pae": np.asarray(out["pae"])[0, 1 : L + 1, 1 : L + 1],
            "ptm": float(np.asarray(out["ptm"])[0]),
        }
        if self.decoder_config.all_atom:
            mask = np.asarray(out["atom37_mask"])[0, 1 : L + 1]
            result["atom37"] = np.where(mask[..., None], np.asarray(out["atom37"])[0, 1 : L + 1], np.nan).astype(np.float32)
        return result


def tokenize_files(encoder_dir: str | Path, files: list[str | Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({'<file name>/<chain id>': (L,) codes}, {same key: one-letter sequence}) for every
    protein chain of every file. Sequence-conditioned decoders need the sequences back."""
    from esm3_jax.structure.io import load_structure

    tok = StructureTokenizer.load(encoder_dir=encoder_dir)
    out: dict[str, np.ndarray] = {}
    sequences: dict[str, str] = {}
    for f in files:
        for chain in load_structure(f):  # StructureError names the file and chain
            key = f"{Path(f).name}/{chain.chain_id}"
            if key in out:
                raise ValueError(f"{f}: key '{key}' already taken by another file of the same name")
            try:
                out[key] = tok.tokenize(chain.backbone, chain.residue_index)
            except ValueError as e:
                raise ValueError(f"{f} chain {chain.chain_id!r}: {e}") from e
            sequences[key] = chain.sequence
    return out, sequences


def write_fasta(path: str | Path, sequences: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f">{key}\n{seq}\n" for key, seq in sequences.items()))
    return path


def read_fasta(path: str | Path) -> dict[str, str]:
    """{header: sequence}; a repeated header or text before the first one is an error."""
    from esm3_jax.data.sources import iter_fasta

    out: dict[str, str] = {}
    for entry in iter_fasta(path):
        header, seq = entry.data
        if header is None:
            raise ValueError(f"{entry.location}: text before the first '>' header")
        if header in out:
            raise ValueError(f"{entry.location}: header '{header}' appears twice")
        out[header] = seq
    return out


def decode_token_file(
    decoder_dir: str | Path, tokens_npz: str | Path, out_dir: str | Path, sequences: dict[str, str] | None = None
) -> dict[str, float]:
    """Write one PDB per key of the .npz (pLDDT x 100 in the B-factors); returns {key: pTM}.

    A sequence-conditioned decoder needs `sequences` ({npz key: one-letter sequence}); an
    all-atom decoder writes every heavy atom it builds, a backbone-only one N, CA, C and the
    geometrically placed O.
    """
    from esm3_jax.structure import geometry
    from esm3_jax.structure.io import ProteinChain, write_structure

    tokens_npz = Path(tokens_npz)
    if not tokens_npz.is_file():
        raise FileNotFoundError(f"{tokens_npz}: no such file")
    tok = StructureTokenizer.load(decoder_dir=decoder_dir)
    if tok.decoder_config.sequence_conditioning and sequences is None:
        raise ValueError(f"{decoder_dir}: this decoder is sequence-conditioned: give the chains' sequences "
                         "(a FASTA keyed like the .npz, as `tokenize-structure --fasta` writes)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ptms = {}
    with np.load(tokens_npz) as npz:
        for key in npz.files:
            codes = npz[key]
            if codes.ndim != 1 or codes.dtype.kind not in "iu":
                raise ValueError(f"{tokens_npz}: '{key}' must be a 1-D integer array, got {codes.dtype} {codes.shape}")
            sequence = None
            if tok.decoder_config.sequence_conditioning:
                if key not in sequences:
                    raise ValueError(f"{tokens_npz}: no sequence given for '{key}'")
                sequence = sequences[key]
            try:
                dec = tok.decode(codes, sequence=sequence)
            except ValueError as e:
                raise ValueError(f"{tokens_npz}: '{key}': {e}") from e
            chain_id = key.rsplit("/", 1)[-1] or "A"
            names = sequence or "X" * len(codes)
            if "atom37" in dec:
                chain = ProteinChain.from_coords(names, dec["atom37"], chain_id=chain_id, b_factor=100.0 * dec["plddt"])
            else:
                chain = ProteinChain.from_coords(names, dec["backbone"], chain_id=chain_id, b_factor=100.0 * dec["plddt"])
                chain = dataclasses.replace(chain, coords=geometry.with_oxygen(chain.coords))
            write_structure(out_dir / (key.replace("/", "_") + ".pdb"), chain)
            ptms[key] = dec["ptm"]
    return ptms
