"""Training the structure tokenizer (`esm3-jax train-vqvae --config configs/vqvae_*.yaml`).

Stage 1 (ESM3_SPEC 5.4) trains encoder, codebook and a small decoder together. The decoder sees
each code through `code_proj(z_q)`, z_q being the codebook's straight-through output, so the
reconstruction losses reach the encoder; at export `code_proj(codebook)` is written into the
decoder's token table, after which the decoder is exactly the released architecture, reading
tokens only. Stage 2 (`train.stage: 2`) freezes a trained encoder (`train.encoder_checkpoint`) and
trains a fresh decoder from its tokens, optionally sequence-conditioned, with the confidence
losses switched on by their weights.

A run writes to train.output_dir: checkpoints/ (resumable), metrics.csv (the loss curve),
encoder/ and decoder/ (params checkpoints for `tokenize-structure` / `decode-structure`) and
eval.json (validation backbone RMSD, LDDT-CA and codebook usage).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from esm3_jax import tokens as T
from esm3_jax.config import ConfigError, apply_overrides, from_dict, to_dict
from esm3_jax.model.codebook import COLLECTION, initial_codes
from esm3_jax.model.vqvae import (
    AMINO_ACIDS,
    N_AMINO_ACIDS,
    DecoderConfig,
    EncoderConfig,
    StructureDecoder,
    StructureEncoder,
    aa_indices,
)
from esm3_jax.compat.params_io import save_params
from esm3_jax.structure import geometry
from esm3_jax.structure.all_atom import atom37_to_atom14, choose_symmetric_naming, torsion_angles
from esm3_jax.structure.io import load_structure
from esm3_jax.train.vqvae import loss as VL
from esm3_jax.train.checkpoint import Checkpointer
from esm3_jax.train.config import TrainConfig
from esm3_jax.train.optim import make_optimizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "structures"


# --- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossWeights:
    distance: float = 1.0
    direction: float = 1.0
    distogram: float = 1.0
    direction_bins: float = 1.0
    inverse_folding: float = 1.0
    commitment: float = 1.0  # on top of the codebook's own 0.25
    # Backbone FAPE: not in the paper, chiral. Experimental: it made mirrored folds more common in
    # the small run (BENCHMARKS.md), a sign of a frame-convention mismatch not yet checked.
    fape: float = 0.0
    plddt: float = 0.0  # stage 2
    pae: float = 0.0  # stage 2
    # Stage 2 with an all-atom decoder (decoder.all_atom): the distance and direction losses over
    # atom14, the torsion-angle loss and its unit-norm penalty (AlphaFold 2 weighs that 0.02).
    all_atom_distance: float = 0.0
    all_atom_direction: float = 0.0
    torsion: float = 0.0
    torsion_norm: float = 0.0

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"train.loss_weights.{f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclasses.dataclass(frozen=True)
class VQVAETrainSettings:
    stage: int = 1
    encoder_checkpoint: str = ""  # stage 2: the frozen encoder (a structure-encoder params dir)
    data_dir: str = ""  # folder with index.jsonl; '' = ../shared/data/structures
    max_train_chains: int = 0  # 0 = all
    max_valid_chains: int = 0
    crop_length: int = 128
    batch_size: int = 8
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0
    seed: int = 0
    output_dir: str = "runs/vqvae"
    log_every: int = 10
    checkpoint_every: int = 500
    # Steps during which the decoder reads the continuous encoder output (no quantisation); the
    # codebook is then fitted to the encoder's outputs. Keeps a codebook fitted to an untrained
    # encoder from collapsing onto a handful of codes.
    vq_warmup_steps: int = 0
    eval_max_length: int = 512
    loss_weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    distance_clamp: float = VL.DISTANCE_CLAMP  # Å^2, on the backbone distance loss's squared errors
    direction_clamp: float = VL.DIRECTION_CLAMP
    # Stage 2 sub-stages 2B/2C (ESM3_SPEC 5.4): an esm3-jax ESM3 checkpoint whose structure
    # predictions from the sequence alone replace the encoder's tokens in a random fraction of
    # the samples, so that the decoder and its confidence heads see ESM3's outputs.
    esm3_checkpoint: str = ""
    esm3_token_probability: float = 0.5

    def validate(self) -> None:
        if self.distance_clamp <= 0 or self.direction_clamp <= 0:
            raise ValueError("train.distance_clamp and train.direction_clamp must be positive")
        if self.stage not in (1, 2):
            raise ValueError(f"train.stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.encoder_checkpoint:
            raise ValueError("train.stage 2 trains a decoder for a frozen encoder: set train.encoder_checkpoint")
        if self.esm3_checkpoint and self.stage != 2:
            raise ValueError("train.esm3_checkpoint (ESM3-predicted tokens) is a stage-2 option")
        if not 0.0 <= self.esm3_token_probability <= 1.0:
            raise ValueError(f"train.esm3_token_probability must be in [0, 1], got {self.esm3_token_probability}")
        for name in ("crop_length", "batch_size", "steps", "log_every", "checkpoint_every", "eval_max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.stage == 1 and not 0 <= self.vq_warmup_steps < self.steps:
            # The codebook is fitted to the encoder at the end of the warm-up: a run that ends
            # before it would export codes fitted to the untrained encoder.
            raise ValueError(f"train.vq_warmup_steps={self.vq_warmup_steps} must be in [0, train.steps={self.steps})")
        self.loss_weights.validate()


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    train: VQVAETrainSettings = dataclasses.field(default_factory=VQVAETrainSettings)

    def validate(self) -> None:
        self.encoder.validate()
        self.decoder.validate()
        self.train.validate()


def load_vqvae_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> VQVAEConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = from_dict(VQVAEConfig, apply_overrides(raw, list(overrides)), str(path))
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    return cfg


# --- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chain:
    name: str  # file/chain
    backbone: np.ndarray  # (L, 3, 3) N, CA, C; NaN where missing
    residue_index: np.ndarray  # (L,)
    aa: np.ndarray  # (L,) indices into AMINO_ACIDS, 20 = other
    atom37: np.ndarray | None = None  # (L, 37, 3), NaN where missing; kept for all-atom decoders


def load_split(data_dir: Path, split: str, max_chains: int = 0, all_atom: bool = False) -> list[Chain]:
    """The chains of one split of index.jsonl (each file parsed once); with all_atom, every
    heavy atom too (atom37), not only the backbone."""
    index = data_dir / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no structure index (set train.data_dir)")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    if max_chains:
        rows = rows[:max_chains]
    by_file: dict[str, list[str]] = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r["chain"])
    chains = []
    for file, wanted in by_file.items():
        found = {c.chain_id: c for c in load_structure(data_dir / file)}
        for chain_id in wanted:
            c = found[chain_id]
            chains.append(Chain(f"{file}/{chain_id}", np.array(c.backbone), np.array(c.residue_index), aa_indices(c.sequence),
                                np.array(c.coords) if all_atom else None))
    if not chains:
        raise ValueError(f"{index}: no chains in split '{split}'")
    return chains


def pad_chains(chains: list[Chain], length: int) -> dict[str, np.ndarray]:
    """Stack chains (each at most `length`) into a padded batch; padding has NaN coordinates."""
    B = len(chains)
    batch = {
        "coords": np.full((B, length, 3, 3), np.nan, np.float32),
        "residue_index": np.zeros((B, length), np.int32),
        "aa": np.full((B, length), N_AMINO_ACIDS, np.int32),
        "valid": np.zeros((B, length), bool),
    }
    if chains[0].atom37 is not None:
        batch["atom37"] = np.full((B, length, 37, 3), np.nan, np.float32)
    for b, c in enumerate(chains):
        n = len(c.aa)
        if c.atom37 is not None:
            batch["atom37"][b, :n] = c.atom37
        batch["coords"][b, :n] = c.backbone
        batch["residue_index"][b, :n] = c.residue_index
        batch["aa"][b, :n] = c.aa
        batch["valid"][b, :n] = True
    return batch


def crop(chain: Chain, length: int, rng: np.random.Generator) -> Chain:
    n = len(chain.aa)
    if n <= length:
        return chain
    s = int(rng.integers(0, n - length + 1))
    atom37 = None if chain.atom37 is None else chain.atom37[s:s + length]
    return Chain(chain.name, chain.backbone[s:s + length], chain.residue_index[s:s + length], chain.aa[s:s + length], atom37)


def batches(chains: list[Chain], batch_size: int, length: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless random crops; batch i depends only on (seed, i), so a resumed run sees the same data."""
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(0, len(chains), batch_size)
        yield pad_chains([crop(chains[i], length, rng) for i in picks], length)
        step += 1


# --- model --------------------------------------------------------------------------------------


def frame_tokens(tokens_BxL, has_token_BxL, valid_BxL):
    """Unframed per-residue codes -> decoder input (B, L+2): BOS, codes (MASK where a residue has
    no structure), EOS right after each chain's last residue, PAD after that."""
    B, L = tokens_BxL.shape
    body = jnp.where(valid_BxL, jnp.where(has_token_BxL, tokens_BxL, T.STRUCTURE_MASK), T.STRUCTURE_PAD)
    framed = jnp.concatenate([jnp.full((B, 1), T.STRUCTURE_BOS), body, jnp.full((B, 1), T.STRUCTURE_PAD)], axis=1)
    n_B = jnp.sum(valid_BxL, axis=1)
    return framed.at[jnp.arange(B), n_B + 1].set(T.STRUCTURE_EOS).astype(jnp.int32)


def _frame_rows(x_BxLx, fill):
    pad = jnp.full((x_BxLx.shape[0], 1, *x_BxLx.shape[2:]), fill, x_BxLx.dtype)
    return jnp.concatenate([pad, x_BxLx, pad], axis=1)


class VQVAE(nn.Module):
    """Encoder + codebook + decoder for stage-1 training (see the module docstring)."""

    encoder_config: EncoderConfig
    decoder_config: DecoderConfig

    def setup(self):
        self.encoder = StructureEncoder(self.encoder_config)
        self.decoder = StructureDecoder(self.decoder_config)
        self.code_proj = self.param(
            "code_proj", nn.initializers.normal(1.0 / math.sqrt(self.encoder_config.d_out)),
            (self.encoder_config.d_out, self.decoder_config.d_model),
        )

    def __call__(self, coords, residue_index, aa, valid, update_codebook: bool = False, quantize: bool = True):
        """quantize=False is the warm-up: the decoder reads the continuous z (no codebook loss, no
        EMA step), so the encoder learns informative outputs before the codebook is fitted to them."""
        enc = self.encoder.encode(coords, residue_index, None, valid, update_codebook and quantize)
        framed = frame_tokens(enc["tokens"], enc["mask"], valid)
        z = enc["z_q"] if quantize else enc["z"]
        if not quantize:
            enc["commitment"] = jnp.zeros(())
        code_emb = _frame_rows(z @ self.code_proj, 0.0)
        dec = self.decoder(framed, sequence_BxL=_frame_rows(aa, N_AMINO_ACIDS), code_embeddings_BxLxD=code_emb)
        out = {k: _strip(k, v) for k, v in dec.items()}
        out.update(tokens=enc["tokens"], has_token=enc["mask"], commitment=enc["commitment"], **enc["metrics"])
        return out


def _strip(key: str, v):
    """Decoder output over framed positions -> over residues (drop BOS and the last slot)."""
    if key == "ptm":
        return v
    if key in ("pae", "distogram_logits", "direction_logits", "pae_logits"):
        return v[:, 1:-1, 1:-1]
    return v[:, 1:-1]


def fold_code_embeddings(params: dict, codebook: dict) -> dict:
    """Decoder params whose token table rows for codes are code_proj(codebook): the decoder then
    reads tokens exactly as it read z_q in training."""
    dec = jax.tree.map(lambda x: x, params["decoder"])
    codes = jnp.asarray(codebook["encoder"]["codebook"]["embeddings"])
    table = jnp.asarray(dec["token_embed"])
    dec["token_embed"] = table.at[: codes.shape[0]].set(codes @ params["code_proj"])
    return dec


def structure_losses(out: dict, batch: dict, t: VQVAETrainSettings) -> dict[str, jnp.ndarray]:
    true, mask, weights = batch["coords"], batch["has_structure"], t.loss_weights
    pred = out["backbone"]
    losses = {
        "distance": VL.backbone_distance_loss(pred, true, mask, t.distance_clamp),
        "direction": VL.backbone_direction_loss(pred, true, mask, t.direction_clamp),
        "distogram": VL.distogram_loss(out["distogram_logits"], true, mask),
        "direction_bins": VL.direction_classification_loss(out["direction_logits"], true, mask),
    }
    if "sequence_logits" in out:
        losses["inverse_folding"] = VL.inverse_folding_loss(out["sequence_logits"], batch["aa"], mask)
    if "commitment" in out:
        losses["commitment"] = out["commitment"]
    if weights.fape:
        losses["fape"] = VL.backbone_fape_loss(out["rot"], out["trans"], pred, true, mask)
    if weights.plddt:
        losses["plddt"] = VL.plddt_loss(out["plddt_logits"], pred, true, mask)
    if weights.pae:
        losses["pae"] = VL.pae_loss(out["pae_logits"], out["rot"], out["trans"], true, mask)
    if "atom14" in out:
        losses.update(all_atom_losses(out, batch, t))
    losses["total"] = sum(getattr(weights, k) * v for k, v in losses.items())
    return losses


def all_atom_losses(out: dict, batch: dict, t: VQVAETrainSettings) -> dict[str, jnp.ndarray]:
    """Stage-2 losses of an all-atom decoder against the batch's atom37, each when its weight is on.

    Symmetric side chains (ASP, GLU, PHE, TYR) are compared under the naming closest to the
    prediction, and the torsion loss takes the closer of a pi-periodic chi's two angles.
    """
    w, aa, has = t.loss_weights, batch["aa"], batch["has_structure"]
    losses = {}
    if w.all_atom_distance or w.all_atom_direction:
        true14, mask14 = atom37_to_atom14(batch["atom37"], aa)
        true14, mask14 = choose_symmetric_naming(out["atom14"], true14, mask14 & has[..., None], aa)
        if w.all_atom_distance:
            losses["all_atom_distance"] = VL.all_atom_distance_loss(out["atom14"], true14, mask14, t.distance_clamp)
        if w.all_atom_direction:
            losses["all_atom_direction"] = VL.all_atom_direction_loss(out["atom14"], true14, mask14, aa, t.direction_clamp)
    if w.torsion or w.torsion_norm:
        tors = torsion_angles(batch["atom37"], aa)
        losses["torsion"], losses["torsion_norm"] = VL.torsion_loss(
            out["torsions"], tors["sin_cos"], tors["alt_sin_cos"], tors["mask"] & has[..., None], has)
    return losses


def _has_structure(batch):
    finite = np.isfinite(batch["coords"]).all((-1, -2))
    return batch | {"has_structure": finite & batch["valid"]}


# --- training -----------------------------------------------------------------------------------


def _optimizer(t: VQVAETrainSettings):
    return make_optimizer(TrainConfig(
        steps=t.steps, learning_rate=t.learning_rate, warmup_steps=min(t.warmup_steps, t.steps - 1), min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay, grad_clip_norm=t.grad_clip_norm,
    ))


class Stage1:
    """Pure functions of the stage-1 trainer: init, codebook init, step."""

    def __init__(self, cfg: VQVAEConfig):
        self.cfg = cfg
        self.model = VQVAE(cfg.encoder, dataclasses.replace(cfg.decoder, inverse_folding_head=cfg.train.loss_weights.inverse_folding > 0))
        self.tx = _optimizer(cfg.train)
        self.step_fns = {q: jax.jit(functools.partial(self._step, quantize=q), donate_argnums=(0,)) for q in (True, False)}
        self._encode = jax.jit(lambda p, b: self.model.apply(
            {"params": p}, b["coords"], b["residue_index"], None, b["valid"],
            method=lambda m, *a: m.encoder.encode_continuous(*a)))

    def init(self, batch: dict, rng: jax.Array) -> dict:
        k_params, k_code, k_init = jax.random.split(rng, 3)
        args = (batch["coords"], batch["residue_index"], batch["aa"], batch["valid"])
        variables = nn.unbox(jax.jit(self.model.init)({"params": k_params, COLLECTION: k_code}, *args))
        params = variables["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "codebook": variables[COLLECTION],
                 "opt_state": self.tx.init(params), "rng": jax.random.fold_in(rng, 1)}
        return self.fit_codebook(state, [batch], k_init)

    def fit_codebook(self, state: dict, some_batches: list[dict], rng: jax.Array) -> dict:
        """Data-dependent (re)initialisation: codes start at current encoder outputs."""
        zs, masks = zip(*(self._encode(state["params"], b) for b in some_batches))
        z = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in zs])
        codes = initial_codes(z, jnp.concatenate([m.reshape(-1) for m in masks]), self.cfg.encoder.n_codes, rng)
        cb = dict(state["codebook"]["encoder"]["codebook"])
        cb.update(embeddings=codes, embed_sum=jnp.array(codes, copy=True), cluster_size=jnp.ones_like(cb["cluster_size"]))
        return state | {"codebook": {"encoder": {"codebook": cb}}}

    def _step(self, state: dict, batch: dict, quantize: bool):
        rng, k = jax.random.split(state["rng"])

        def loss_fn(params):
            out, mutated = self.model.apply(
                {"params": params, COLLECTION: state["codebook"]},
                batch["coords"], batch["residue_index"], batch["aa"], batch["valid"], update_codebook=True,
                quantize=quantize, mutable=[COLLECTION], rngs={COLLECTION: k},
            )
            losses = structure_losses(out, batch, self.cfg.train)
            metrics = {n: out[n] for n in ("codebook_usage", "codebook_perplexity", "codebook_dead_codes")}
            return losses["total"], (losses, metrics, mutated[COLLECTION])

        (_, (losses, metrics, codebook)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "codebook": codebook, "opt_state": opt_state, "rng": rng}
        return new, {**losses, **metrics, "grad_norm": optax.tree.norm(grads)}

    def export(self, state: dict, out_dir: Path) -> tuple[Path, Path]:
        """Write encoder/ and decoder/ params checkpoints that the CLI verbs load."""
        params = jax.device_get(state["params"])
        codebook = jax.device_get(state["codebook"])
        enc_vars = {"params": params["encoder"], "codebook": codebook["encoder"]}
        enc_dir = save_params(out_dir / "encoder", enc_vars, to_dict(self.cfg.encoder), "structure-encoder")
        dec_cfg = self.model.decoder_config
        dec_dir = save_params(out_dir / "decoder", {"params": fold_code_embeddings(params, codebook)}, to_dict(dec_cfg),
                              "structure-decoder")
        return enc_dir, dec_dir


@functools.lru_cache(maxsize=2)
def _stage1(cfg: VQVAEConfig) -> Stage1:
    """Stage-1 trainers hold only compiled functions of the config: reuse them within a process."""
    return Stage1(cfg)


# ESM3 sequence-track ids of AMINO_ACIDS, then X for unknown residues (index 20).
_ESM3_SEQUENCE_IDS = np.array([T.SEQUENCE_VOCAB.index(a) for a in AMINO_ACIDS + "X"], np.int32)


def esm3_structure_tokens(model: nn.Module, params, tokens_BxL, aa_BxL, n_codes: int) -> jnp.ndarray:
    """The structure tokens ESM3 predicts from the sequence alone: (B, L) codes in [0, n_codes).

    tokens_BxL are framed decoder inputs (BOS, ..., EOS, PAD), whose framing the sequence track
    copies; aa_BxL are AMINO_ACIDS indices at the same positions. The structure track is all
    MASK and no coordinates are given; each position takes the argmax of the structure logits
    over the codebook's codes (a small codebook uses only the first n_codes of ESM3's 4096).
    Padding is a sequence of its own, so a chain's prediction is independent of its batch.
    """
    seq = jnp.asarray(_ESM3_SEQUENCE_IDS)[aa_BxL]
    for struct_id, seq_id in ((T.STRUCTURE_BOS, T.SEQUENCE_BOS), (T.STRUCTURE_EOS, T.SEQUENCE_EOS),
                              (T.STRUCTURE_PAD, T.SEQUENCE_PAD)):
        seq = jnp.where(tokens_BxL == struct_id, seq_id, seq)
    sequence_id = (tokens_BxL == T.STRUCTURE_PAD).astype(jnp.int32)
    out = model.apply({"params": params}, sequence_tokens=seq, sequence_id=sequence_id)
    return jax.lax.stop_gradient(jnp.argmax(out["structure_logits"][..., :n_codes], axis=-1).astype(jnp.int32))


class Stage2:
    """Stage 2: a frozen encoder (train.encoder_checkpoint) makes the tokens; a fresh decoder,
    optionally sequence-conditioned and all-atom, learns to decode them (losses by their
    weights). With train.esm3_checkpoint, each sample's tokens are, with probability
    train.esm3_token_probability, ESM3's prediction from its sequence instead (sub-stages 2B/2C)."""

    def __init__(self, cfg: VQVAEConfig):
        from esm3_jax.inference.structure_tokenizer import load_encoder

        self.cfg = cfg
        self.encoder_config, encoder_variables = load_encoder(cfg.train.encoder_checkpoint)
        self.decoder = StructureDecoder(dataclasses.replace(cfg.decoder, inverse_folding_head=cfg.train.loss_weights.inverse_folding > 0))
        self.esm3, esm3_params = None, None
        if cfg.train.esm3_checkpoint:
            from esm3_jax.inference.forward import load_esm3
            from esm3_jax.model.esm3 import ESM3

            esm3_config, esm3_params = load_esm3(cfg.train.esm3_checkpoint)
            self.esm3 = ESM3(esm3_config)
        # The frozen models' weights are arguments of the compiled functions, not constants
        # folded into them (ESM3 alone may be billions of parameters).
        self.frozen = jax.device_put({"encoder": encoder_variables, "esm3": esm3_params})
        self.tx = _optimizer(cfg.train)
        step = jax.jit(self._step, donate_argnums=(0,))
        self.step_fns = {q: (lambda state, batch: step(state, batch, self.frozen)) for q in (True, False)}
        inputs = jax.jit(self._decoder_inputs)
        self.decoder_inputs = lambda batch, key: inputs(self.frozen, batch, key)

    def _decoder_inputs(self, frozen, batch, key):
        """(framed tokens, framed amino acids, per-sample flag of ESM3-predicted tokens or None).

        Residues without structure stay MASK either way. No gradient reaches the encoder or ESM3.
        """
        enc = StructureEncoder(self.encoder_config).apply(
            frozen["encoder"], batch["coords"], batch["residue_index"], None, batch["valid"], method=StructureEncoder.encode)
        tokens = frame_tokens(enc["tokens"], enc["mask"], batch["valid"])
        aa = _frame_rows(batch["aa"], N_AMINO_ACIDS)
        if self.esm3 is None:
            return tokens, aa, None
        predicted = esm3_structure_tokens(self.esm3, frozen["esm3"], tokens, aa, self.encoder_config.n_codes)
        use_B = jax.random.bernoulli(key, self.cfg.train.esm3_token_probability, (tokens.shape[0],))
        is_code = tokens < T.STRUCTURE_CODEBOOK_SIZE
        return jnp.where(use_B[:, None] & is_code, predicted, tokens), aa, use_B

    def init(self, batch: dict, rng: jax.Array) -> dict:
        tokens, aa, _ = self.decoder_inputs(batch, rng)
        params = nn.unbox(jax.jit(lambda k, t, a: self.decoder.init(k, t, sequence_BxL=a))(rng, tokens, aa))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                "rng": jax.random.fold_in(rng, 1)}

    def _step(self, state: dict, batch: dict, frozen: dict):
        # The augmentation draw depends only on (seed, step): reruns and resumed runs agree.
        tokens, aa, from_esm3 = self._decoder_inputs(frozen, batch, jax.random.fold_in(state["rng"], state["step"]))

        def loss_fn(params):
            out = self.decoder.apply({"params": params}, tokens, sequence_BxL=aa)
            losses = structure_losses({k: _strip(k, v) for k, v in out.items()}, batch, self.cfg.train)
            return losses["total"], losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new = state | {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        metrics = {**losses, "grad_norm": optax.tree.norm(grads)}
        if from_esm3 is not None:
            metrics["esm3_token_fraction"] = jnp.mean(from_esm3.astype(jnp.float32))
        return new, metrics

    def export(self, state: dict, out_dir: Path) -> tuple[Path, Path]:
        enc_dir = save_params(out_dir / "encoder", jax.device_get(self.frozen["encoder"]), to_dict(self.encoder_config),
                              "structure-encoder")
        dec_dir = save_params(out_dir / "decoder", {"params": jax.device_get(state["params"])},
                              to_dict(self.decoder.config), "structure-decoder")
        return enc_dir, dec_dir


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(encoder_dir: Path, decoder_dir: Path, chains: list[Chain], max_length: int) -> dict[str, Any]:
    """Round trip through the exported checkpoints (tokens only): RMSD, LDDT-CA, codebook usage;
    for an all-atom decoder also the means of geometry.all_atom_comparison's heavy-atom metrics."""
    from esm3_jax.inference.structure_tokenizer import StructureTokenizer

    tok = StructureTokenizer.load(encoder_dir, decoder_dir)
    dist = lambda x: np.linalg.norm(x.reshape(-1, 1, 3) - x.reshape(1, -1, 3), axis=-1)  # all atom pairs
    rmsds, mirror_rmsds, drms, lddts, used, all_atom = [], [], [], [], [], []
    for c in chains:
        c = crop(c, max_length, np.random.default_rng(0))
        tokens = tok.tokenize(c.backbone, c.residue_index)
        sequence = "".join(AMINO_ACIDS[i] if i < N_AMINO_ACIDS else "X" for i in c.aa)
        dec = tok.decode(tokens, sequence=sequence)
        if "atom37" in dec and c.atom37 is not None:
            all_atom.append(geometry.all_atom_comparison(dec["atom37"], c.atom37, sequence))
        has = np.isfinite(c.backbone).all((-1, -2))
        pred, true = dec["backbone"][has], c.backbone[has]
        rmsds.append(geometry.rmsd(pred, true))
        # Distances cannot tell a mirror image: how far the decoded fold is from the truth's
        # mirror, and the distance-matrix error (dRMS) that the distance loss sees.
        mirror_rmsds.append(geometry.rmsd(pred, true * np.array([-1.0, 1.0, 1.0])))
        drms.append(float(np.sqrt(np.mean((dist(pred) - dist(true)) ** 2))))
        lddts.append(geometry.lddt_ca(dec["backbone"][:, 1][has], c.backbone[:, 1][has]))
        used.append(tokens[tokens >= 0])
    all_codes = np.concatenate(used)
    counts = np.bincount(all_codes, minlength=tok.encoder_config.n_codes)
    p = counts[counts > 0] / counts.sum()
    heavy_atoms = {f"{k}_mean": float(np.nanmean([m[k] for m in all_atom])) for k in (all_atom[0] if all_atom else ())}
    return {
        "chains": len(chains),
        "backbone_rmsd_mean": float(np.mean(rmsds)),
        "backbone_rmsd_median": float(np.median(rmsds)),
        "lddt_ca_mean": float(np.mean(lddts)),
        "drms_mean": float(np.mean(drms)),
        "mirror_rmsd_mean": float(np.mean(mirror_rmsds)),
        "mirror_closer_fraction": float(np.mean(np.array(mirror_rmsds) < np.array(rmsds))),
        "codes_used": int((counts > 0).sum()),
        "codebook_usage": float((counts > 0).mean()),
        "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum())),
    } | heavy_atoms


# --- the run ------------------------------------------------------------------------------------


def train(cfg: VQVAEConfig, progress: bool = True) -> dict[str, Any]:
    t = cfg.train
    data_dir = Path(t.data_dir) if t.data_dir else DEFAULT_DATA
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_atom = cfg.decoder.all_atom
    train_chains = load_split(data_dir, "train", t.max_train_chains, all_atom)
    valid_chains = load_split(data_dir, "valid", t.max_valid_chains, all_atom)

    trainer = _stage1(cfg) if t.stage == 1 else Stage2(cfg)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=2, async_save=False)
    first = _has_structure(next(batches(train_chains, t.batch_size, t.crop_length, t.seed)))
    state = trainer.init(first, jax.random.PRNGKey(t.seed))
    restored = ckpt.restore_latest(state, None)
    start = 0
    if restored is not None:
        start, state = restored
        print(f"resumed from step {start}")

    metrics_path = out_dir / "metrics.csv"
    writer, fh = None, None
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, disable=not progress, desc="train-vqvae", unit="step")
    t0 = time.time()
    data = batches(train_chains, t.batch_size, t.crop_length, t.seed, start)
    for step in range(start, t.steps):
        if t.stage == 1 and step == t.vq_warmup_steps and step > 0:
            # End of the warm-up: fit the codebook to what the encoder now produces.
            fit_data = batches(train_chains, t.batch_size, t.crop_length, t.seed + 1)
            fit = [{k: jnp.asarray(v) for k, v in _has_structure(next(fit_data)).items()} for _ in range(4)]
            state = trainer.fit_codebook(state, fit, jax.random.PRNGKey(t.seed + step))
        batch = {k: jnp.asarray(v) for k, v in _has_structure(next(data)).items()}
        state, m = trainer.step_fns[step >= t.vq_warmup_steps](state, batch)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            row = {"step": done, "time_s": round(time.time() - t0, 1), **{k: float(v) for k, v in m.items()}}
            if writer is None:
                fh = metrics_path.open("a" if start else "w", newline="")
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if not start:
                    writer.writeheader()
            writer.writerow(row)
            fh.flush()
            bar.set_postfix(loss=f"{row['total']:.3f}", dist=f"{row['distance']:.2f}")
        if done % t.checkpoint_every == 0 or done == t.steps:
            ckpt.save(done, state, None, to_dict(cfg))
        bar.update(1)
    bar.close()
    ckpt.close()
    if fh is not None:
        fh.close()
    enc_dir, dec_dir = trainer.export(state, out_dir)
    result = evaluate(enc_dir, dec_dir, valid_chains, t.eval_max_length)
    result.update(steps=t.steps, train_chains=len(train_chains), train_seconds=round(time.time() - t0, 1))
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/vqvae_small.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate the run's exported encoder/ and decoder/ on the valid split "
                        "(e.g. with train.eval_max_length=96 for crops of the training length)")
    p.add_argument("--split", default="valid", choices=("valid", "train"),
                   help="--eval-only: the split to evaluate (train.max_valid_chains caps its size)")


def evaluate_run(cfg: VQVAEConfig, split: str = "valid") -> dict[str, Any]:
    """evaluate() of an output_dir's exported checkpoints on a split, as the config says."""
    t = cfg.train
    out_dir = Path(t.output_dir)
    enc_dir, dec_dir = out_dir / "encoder", out_dir / "decoder"
    for d in (enc_dir, dec_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no exported checkpoint; train first (train.output_dir={t.output_dir})")
    chains = load_split(Path(t.data_dir) if t.data_dir else DEFAULT_DATA, split, t.max_valid_chains, cfg.decoder.all_atom)
    return evaluate(enc_dir, dec_dir, chains, t.eval_max_length) | {"split": split, "eval_max_length": t.eval_max_length}


def cli_main(args: argparse.Namespace) -> int:
    if args.split != "valid" and not args.eval_only:
        raise ValueError("--split chooses what --eval-only evaluates; training always evaluates on valid")
    cfg = load_vqvae_config(args.config, args.overrides)
    result = evaluate_run(cfg, args.split) if args.eval_only else train(cfg, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0
