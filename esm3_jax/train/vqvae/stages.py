"""The two training stages (ESM3_SPEC 5.4): Stage1 trains encoder, codebook and a small decoder
together; Stage2 trains a fresh decoder on a frozen encoder's tokens. Each compiles init/step/export."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from esm3_jax import tokens as T
from esm3_jax.compat.params_io import save_params
from esm3_jax.config import to_dict
from esm3_jax.model.codebook import COLLECTION, initial_codes
from esm3_jax.model.vqvae import N_AMINO_ACIDS, StructureDecoder, StructureEncoder
from esm3_jax.train.config import TrainConfig
from esm3_jax.train.optim import make_optimizer
from esm3_jax.train.vqvae.config import VQVAEConfig, VQVAETrainSettings
from esm3_jax.train.vqvae.loss import structure_losses
from esm3_jax.train.vqvae.model import VQVAE, _frame_rows, _strip, esm3_structure_tokens, fold_code_embeddings, frame_tokens


def _has_structure(batch):
    finite = np.isfinite(batch["coords"]).all((-1, -2))
    return batch | {"has_structure": finite & batch["valid"]}


def optimizer_config(t: VQVAETrainSettings) -> TrainConfig:
    """The update rule's settings: the VQ-VAE's schedule, decay and clipping; betas, eps and the
    no-decay patterns are TrainConfig's defaults."""
    return TrainConfig(
        steps=t.steps, learning_rate=t.learning_rate, warmup_steps=min(t.warmup_steps, t.steps - 1), min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay, grad_clip_norm=t.grad_clip_norm,
    )


def _optimizer(t: VQVAETrainSettings):
    return make_optimizer(optimizer_config(t))


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

    def init(self, batch: dict, rng: jax.Array, resuming: bool = False) -> dict:
        """A fresh state, its codebook fitted to the first batch's encodings; `resuming` skips
        that fit (the checkpoint replaces the state)."""
        k_params, k_code, k_init = jax.random.split(rng, 3)
        args = (batch["coords"], batch["residue_index"], batch["aa"], batch["valid"])
        variables = nn.unbox(jax.jit(self.model.init)({"params": k_params, COLLECTION: k_code}, *args))
        params = variables["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "codebook": variables[COLLECTION],
                 "opt_state": self.tx.init(params), "rng": jax.random.fold_in(rng, 1)}
        return state if resuming else self.fit_codebook(state, [batch], k_init)

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


def _start_from_decoder(params: dict, directory: str) -> dict:
    """`params` with every leaf that `directory`'s decoder has at the same path and shape taken
    from it; prints how many were taken. A decoder that shares nothing is an error."""
    from esm3_jax.inference.structure_tokenizer import load_decoder

    _, variables = load_decoder(directory)
    donor = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])}
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    matches = [donor.get(jax.tree_util.keystr(path)) for path, _ in paths_and_leaves]
    matches = [m if m is not None and m.shape == leaf.shape else None for m, (_, leaf) in zip(matches, paths_and_leaves)]
    if all(m is None for m in matches):
        raise ValueError(f"{directory}: train.decoder_init shares no parameter (name and shape) with this decoder")
    params = treedef.unflatten([leaf if m is None else jnp.asarray(m, leaf.dtype) for m, (_, leaf) in zip(matches, paths_and_leaves)])
    taken = [leaf.size for m, (_, leaf) in zip(matches, paths_and_leaves) if m is not None]
    total = sum(leaf.size for _, leaf in paths_and_leaves)
    print(f"decoder_init: {len(taken)} of {len(matches)} decoder arrays ({sum(taken):,} of {total:,} weights) from {directory}")
    return params


@functools.lru_cache(maxsize=2)
def _stage1(cfg: VQVAEConfig) -> Stage1:
    """Stage-1 trainers hold only compiled functions of the config: reuse them within a process."""
    return Stage1(cfg)


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

    def init(self, batch: dict, rng: jax.Array, resuming: bool = False) -> dict:
        """A fresh state; with train.decoder_init the decoder starts from that decoder's weights,
        unless `resuming` (the checkpoint replaces them, and the donor need not exist any more)."""
        tokens, aa, _ = self.decoder_inputs(batch, rng)
        params = nn.unbox(jax.jit(lambda k, t, a: self.decoder.init(k, t, sequence_BxL=a))(rng, tokens, aa))["params"]
        if self.cfg.train.decoder_init and not resuming:
            params = _start_from_decoder(params, self.cfg.train.decoder_init)
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
