"""The PyTorch alternative to esm3-jax's VQ-VAE stage-1 train step: the reference `esm`
StructureTokenEncoder and StructureTokenDecoder, trained the way train/vqvae/stages.py trains
ours. This is what a user would write instead of esm3-jax, and what `esm3-jax bench vqvae-step
--against-torch` times side by side with the JAX step.

The reference has no training code, so the pieces it lacks are ported here from esm3-jax, line
for line in meaning:
- the EMA codebook (model/codebook.py): nearest code, straight-through estimator, the masked
  commitment loss, and the EMA update with dead-code restarts (the reference stops at
  `assert False, "Not implemented"`). It works on the reference codebook's own buffers
  (`embeddings`, `N`, `z_avg`);
- the decoder reading each code as `code_proj(z_q)` (train/vqvae/model.py), where the reference
  decoder only embeds token ids, and the inverse-folding head (the reference's RegressionHead
  class, added as `decoder.sequence_head`, the name the weight conversion maps);
- the stage-1 losses of train/vqvae/loss.py: backbone distance and direction (clamped squared
  errors), binned distogram and directions, inverse folding, commitment, backbone FAPE.
Like XLA, which drops what no loss reads, the loop runs the L x L pairwise head only when a
binned loss is on.
Padding is handled as ours handles it: the encoder gets the attention mask, and the decoder
gives PAD positions a sequence id of their own, so real positions never attend to padding
(the reference decoder ignores its attention mask).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import numpy as np

from esm3_jax import tokens as T
from esm3_jax.compat.layouts import state_to_variables, variables_to_state
from esm3_jax.compat.tokenizer_weights import decoder_rows, encoder_rows
from esm3_jax.model.structure_heads import N_DIRECTION_BINS
from esm3_jax.model.vqvae import N_AMINO_ACIDS, DecoderConfig, EncoderConfig
from esm3_jax.train.vqvae.config import VQVAEConfig, VQVAETrainSettings
from esm3_jax.train.vqvae.loss import DISTOGRAM_EDGES

# The losses this module ports; a config that weights any other loss is refused.
PORTED_LOSSES = ("distance", "direction", "distogram", "direction_bins", "inverse_folding", "commitment", "fape")


def check_portable(cfg: VQVAEConfig) -> None:
    """Raise ValueError if the config needs something the torch peer does not have."""
    w, e, d = cfg.train.loss_weights, cfg.encoder, cfg.decoder
    extra = [name for name, value in vars(w).items() if value and name not in PORTED_LOSSES]
    if extra:
        raise ValueError(f"the torch peer ports the stage-1 losses {', '.join(PORTED_LOSSES)}; this config also weights "
                         f"{', '.join(extra)} (set train.loss_weights.<name>=0)")
    if cfg.train.stage != 1:
        raise ValueError("the torch peer is the stage-1 step (encoder + codebook + decoder); set train.stage=1")
    if d.sequence_conditioning or d.all_atom:
        raise ValueError("the torch peer's decoder is the released one: decoder.sequence_conditioning and "
                         "decoder.all_atom must be off")
    # The reference encoder hard-codes these.
    if e.knn != 16 or e.relpos_bins != 32 or e.ffn_expansion != 4.0:
        raise ValueError(f"the reference encoder has knn 16, relative positions +-32 and FFN x4; got {e}")


def _import_torch():
    import torch

    return torch


# --- the model -------------------------------------------------------------------------------------


def build_torch_stage1(cfg: VQVAEConfig, seed: int = 0):
    """The reference encoder and decoder at the config's sizes with their random init, a
    `code_proj` initialised as ours (normal, std 1/sqrt(d_out)), and the inverse-folding head when
    its loss is on. Returns a TorchStage1 module."""
    torch = _import_torch()
    torch.manual_seed(seed)
    return TorchStage1(cfg.encoder, cfg.decoder, cfg.train.loss_weights.inverse_folding > 0)


@functools.lru_cache(maxsize=1)
def _module_class():
    torch = _import_torch()
    from esm.models.vqvae import RegressionHead, StructureTokenDecoder, StructureTokenEncoder

    class _TorchStage1(torch.nn.Module):
        def __init__(self, enc: EncoderConfig, dec: DecoderConfig, inverse_folding: bool):
            super().__init__()
            self.encoder = StructureTokenEncoder(d_model=enc.d_model, n_heads=1, v_heads=enc.v_heads,
                                                 n_layers=enc.n_layers, d_out=enc.d_out, n_codes=enc.n_codes)
            self.decoder = StructureTokenDecoder(d_model=dec.d_model, n_heads=dec.n_heads, n_layers=dec.n_layers)
            if inverse_folding:
                self.decoder.sequence_head = RegressionHead(dec.d_model, N_AMINO_ACIDS)
            self.code_proj = torch.nn.Parameter(torch.randn(enc.d_out, dec.d_model) / math.sqrt(enc.d_out))
            self.encoder_config = enc

        def forward(self, batch: Mapping):
            return stage1_forward(self, batch)

    return _TorchStage1


def TorchStage1(enc: EncoderConfig, dec: DecoderConfig, inverse_folding: bool):
    return _module_class()(enc, dec, inverse_folding)


def _quantize(codes_KxC, z_BxLxC, mask_BxL, commitment_weight: float):
    """model/codebook.py's EMACodebook.__call__: (straight-through z_q, indices, commitment)."""
    torch = _import_torch()
    B, L, C = z_BxLxC.shape
    z = z_BxLxC.reshape(B * L, C)
    zd = z.detach()
    # The same three terms as nearest_code (and the reference), so near-ties round alike.
    d_NxK = (zd ** 2).sum(1, keepdim=True) - 2.0 * zd @ codes_KxC.t() + (codes_KxC ** 2).sum(1)[None, :]
    idx_N = torch.argmin(d_NxK, dim=1)
    e = codes_KxC[idx_N]
    w = mask_BxL.reshape(B * L).float()
    sq_N = ((z - e.detach()) ** 2).mean(1)
    commitment = commitment_weight * (sq_N * w).sum() / w.sum().clamp(min=1.0)
    z_st = z + (e - z).detach()
    return z_st.reshape(B, L, C), idx_N.reshape(B, L), commitment


def _frame_tokens(idx_BxL, has_token_BxL, valid_BxL):
    """train/vqvae/model.py's frame_tokens: BOS, codes (MASK without structure), EOS, PAD."""
    torch = _import_torch()
    body = torch.where(valid_BxL, torch.where(has_token_BxL, idx_BxL, T.STRUCTURE_MASK), T.STRUCTURE_PAD)
    framed = torch.cat([torch.full_like(body[:, :1], T.STRUCTURE_BOS), body,
                        torch.full_like(body[:, :1], T.STRUCTURE_PAD)], dim=1)
    eos_at = (valid_BxL.sum(1) + 1)[:, None]
    return framed.scatter(1, eos_at, torch.full_like(eos_at, T.STRUCTURE_EOS))


def _frame_rows(x_BxLxD):
    torch = _import_torch()
    pad = torch.zeros_like(x_BxLxD[:, :1])
    return torch.cat([pad, x_BxLxD, pad], dim=1)


def stage1_forward(model, batch: Mapping, pairwise: bool = True) -> dict:
    """Encoder (the reference's local-structure encoding) -> codebook (ported) -> decoder (the
    reference's stack and heads, reading codes through code_proj). Outputs over residues, as
    train/vqvae/model.py's VQVAE returns them, plus what the EMA step needs."""
    torch = _import_torch()
    from esm.utils.structure.affine3d import build_affine3d_from_coordinates

    enc, dec, ecfg = model.encoder, model.decoder, model.encoder_config
    coords, valid = batch["coords"], batch["valid"]
    B, L = valid.shape
    affine, affine_mask = build_affine3d_from_coordinates(coords)
    z = enc.encode_local_structure(coords=coords, affine=affine, attention_mask=valid,
                                   sequence_id=torch.zeros_like(batch["residue_index"]), affine_mask=affine_mask,
                                   residue_index=batch["residue_index"])
    has_token = affine_mask & valid
    z = enc.pre_vq_proj(z.masked_fill(~has_token[..., None], 0.0))
    z_q, idx, commitment = _quantize(enc.codebook.embeddings, z, has_token, ecfg.commitment_weight)

    framed = _frame_tokens(idx, has_token, valid)
    x = dec.embed(framed)
    is_code = (framed < T.STRUCTURE_CODEBOOK_SIZE)[..., None]
    x = torch.where(is_code, _frame_rows(z_q @ model.code_proj), x)
    seq_id = (framed == T.STRUCTURE_PAD).long()
    x, _, _ = dec.decoder_stack(x, sequence_id=seq_id, affine=None, affine_mask=None, chain_id=torch.zeros_like(seq_id))
    affine_12, backbone = dec.affine_output_projection(x, affine=None, affine_mask=torch.zeros_like(framed, dtype=torch.bool))
    # Affine3D's flat layout: the 3 x 3 rotation row by row, then the translation.
    out = {"backbone": backbone[:, 1:-1], "rot": affine_12[:, 1:-1, :9].unflatten(-1, (3, 3)),
           "trans": affine_12[:, 1:-1, 9:], "commitment": commitment,
           "z": z.detach().reshape(B * L, -1), "tokens": idx.reshape(B * L), "has_token": has_token.reshape(B * L)}
    if pairwise:
        n_dist, n_dir, _ = dec.pairwise_bins
        pair = dec.pairwise_classification_head(x)[:, 1:-1, 1:-1]
        out.update(distogram_logits=pair[..., :n_dist], direction_logits=pair[..., n_dist:n_dist + n_dir])
    if hasattr(dec, "sequence_head"):
        out["sequence_logits"] = dec.sequence_head(x)[:, 1:-1]
    return out


# --- the EMA codebook update -------------------------------------------------------------------------


def ema_codebook_step(codebook, z_NxC, idx_N, mask_N, decay: float, restart_threshold: float, generator=None):
    """model/codebook.py's _ema_step on the reference codebook's buffers (N = cluster sizes,
    z_avg = embedding sums). Dead codes restart at random valid rows of this batch, drawn from
    torch's generator (so a restart picks other rows than the JAX side's)."""
    torch = _import_torch()
    with torch.no_grad():
        K, C = codebook.embeddings.shape
        w = mask_N.float()
        onehot_NxK = torch.nn.functional.one_hot(idx_N, K).float() * w[:, None]
        size_K = decay * codebook.N + (1 - decay) * onehot_NxK.sum(0)
        sum_KxC = decay * codebook.z_avg + (1 - decay) * (onehot_NxK.t() @ z_NxC)
        total = size_K.sum()
        smoothed_K = (size_K + 1e-5) / (total + K * 1e-5) * total
        new_codes = sum_KxC / smoothed_K[:, None]
        dead_K = size_K < restart_threshold
        # model/codebook.py's initial_codes: rows drawn with replacement from the valid ones, plus noise.
        rows = torch.multinomial(w / w.sum().clamp(min=1.0), K, replacement=True, generator=generator)
        fresh = z_NxC[rows] + torch.randn(K, C, generator=generator) * (0.01 / math.sqrt(C))
        codebook.embeddings.copy_(torch.where(dead_K[:, None], fresh, new_codes))
        codebook.z_avg.copy_(torch.where(dead_K[:, None], fresh, sum_KxC))
        codebook.N.copy_(torch.where(dead_K, torch.ones_like(size_K), size_K))
        return dead_K


# --- the stage-1 losses -------------------------------------------------------------------------------


def _masked_mean(x, mask):
    w = mask.float()
    return (x * w).sum() / w.sum().clamp(min=1.0)


def _cross_entropy(logits, target):
    return -logits.float().log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)


def _zero_missing(x_BxLx3x3, mask_BxL):
    torch = _import_torch()
    return torch.where(mask_BxL[..., None, None], x_BxLx3x3.nan_to_num(), torch.zeros((), dtype=x_BxLx3x3.dtype))


def backbone_distance_loss(pred, true, mask, clamp: float):
    B, L = mask.shape
    p = pred.reshape(B, 3 * L, 3)
    t = _zero_missing(true, mask).reshape(B, 3 * L, 3)
    m = mask.repeat_interleave(3, dim=1)
    dist = lambda x: (((x[:, :, None] - x[:, None, :]) ** 2).sum(-1) + 1e-8).sqrt()
    err = ((dist(p) - dist(t)) ** 2).clamp(max=clamp)
    return _masked_mean(err, m[:, :, None] & m[:, None, :])


def backbone_vectors(x_BxLx3x3, mask_BxL):
    torch = _import_torch()
    x = _zero_missing(x_BxLx3x3, mask_BxL)
    n, ca, c = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    n_next = torch.cat([n[:, 1:], n[:, -1:]], dim=1)
    ca_next = torch.cat([ca[:, 1:], ca[:, -1:]], dim=1)
    v1, v2, v3 = ca - n, c - ca, n_next - c
    v1_next = ca_next - n_next
    cross = lambda a, b: torch.linalg.cross(a, b, dim=-1)
    vecs = torch.stack([v1, v2, v3, cross(v1, v2), cross(v2, v3), cross(v3, v1_next)], dim=2)
    ok = mask_BxL & torch.cat([mask_BxL[:, 1:], torch.zeros_like(mask_BxL[:, :1])], dim=1)
    return vecs, ok


def backbone_direction_loss(pred, true, mask, clamp: float):
    B, L = mask.shape
    vp, ok = backbone_vectors(pred, mask)
    vt, _ = backbone_vectors(true, mask)
    gram = lambda v: v.reshape(B, 6 * L, 3) @ v.reshape(B, 6 * L, 3).transpose(1, 2)
    err = ((gram(vp) - gram(vt)) ** 2).clamp(max=clamp)
    m = ok.repeat_interleave(6, dim=1)
    return _masked_mean(err, m[:, :, None] & m[:, None, :])


def _virtual_cb(x):
    torch = _import_torch()
    n, ca, c = x[..., 0, :], x[..., 1, :], x[..., 2, :]
    b, cc = ca - n, c - ca
    a = torch.linalg.cross(b, cc, dim=-1)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


def distogram_loss(logits, true, mask):
    torch = _import_torch()
    cb = _virtual_cb(_zero_missing(true, mask))
    d = ((cb[:, :, None] - cb[:, None, :]) ** 2).sum(-1).sqrt()
    target = (d[..., None] > torch.from_numpy(DISTOGRAM_EDGES)).sum(-1)
    return _masked_mean(_cross_entropy(logits, target), mask[:, :, None] & mask[:, None, :])


def direction_classification_loss(logits, true, mask):
    torch = _import_torch()
    vt, ok = backbone_vectors(true, mask)
    unit = vt / (vt.norm(dim=-1, keepdim=True) + 1e-6)
    cos = torch.einsum("bikc,bjkc->bijk", unit, unit)
    target = ((cos + 1.0) / 2.0 * N_DIRECTION_BINS).floor().clamp(0, N_DIRECTION_BINS - 1).long()
    logits = logits.reshape(*logits.shape[:3], 6, N_DIRECTION_BINS)
    pair = (ok[:, :, None] & ok[:, None, :])[..., None].expand(target.shape)
    return _masked_mean(_cross_entropy(logits, target), pair)


def _gram_schmidt(x_axis, xy_plane, eps: float = 1e-10):
    """model/frames.py's gram_schmidt: columns e1 (along x_axis), e2 (in the xy-plane), e3."""
    torch = _import_torch()
    e1 = x_axis / ((x_axis ** 2).sum(-1, keepdim=True) + eps).sqrt()
    u = xy_plane - e1 * (e1 * xy_plane).sum(-1, keepdim=True)
    e2 = u / ((u ** 2).sum(-1, keepdim=True) + eps).sqrt()
    return torch.stack([e1, e2, torch.linalg.cross(e1, e2, dim=-1)], dim=-1)


def backbone_fape_loss(pred_rot, pred_trans, pred, true, mask, clamp: float):
    """train/vqvae/loss.py's backbone_fape_loss: every backbone atom in every residue's frame,
    prediction against truth, the distance clamped at `clamp` Å and divided by 10 Å."""
    torch = _import_torch()
    B, L = mask.shape
    true = _zero_missing(true, mask)
    n, ca, c = true[..., 0, :], true[..., 1, :], true[..., 2, :]
    true_rot, true_trans = _gram_schmidt(ca - c, n - ca), ca
    local = lambda rot, t, x: torch.einsum("bimn,bijm->bijn", rot, x[:, None] - t[:, :, None])
    pred_local = local(pred_rot, pred_trans, pred.reshape(B, 3 * L, 3))
    true_local = local(true_rot, true_trans, true.reshape(B, 3 * L, 3))
    err = (((pred_local - true_local) ** 2).sum(-1) + 1e-8).sqrt().reshape(B, L, L, 3)
    pair = (mask[:, :, None, None] & mask[:, None, :, None]).expand(err.shape)
    return _masked_mean(err.clamp(max=clamp), pair) / 10.0


def inverse_folding_loss(logits, aa, mask):
    torch = _import_torch()
    known = mask & (aa < logits.shape[-1])
    return _masked_mean(_cross_entropy(logits, torch.where(known, aa, torch.zeros_like(aa))), known)


def stage1_losses(out: Mapping, batch: Mapping, t: VQVAETrainSettings) -> dict:
    """train/vqvae/loss.py's structure_losses for the ported stage-1 losses, and their weighted sum."""
    true, mask, w = batch["coords"], batch["has_structure"], t.loss_weights
    pred = out["backbone"]
    losses = {}
    if w.distance:
        losses["distance"] = backbone_distance_loss(pred, true, mask, t.distance_clamp)
    if w.direction:
        losses["direction"] = backbone_direction_loss(pred, true, mask, t.direction_clamp)
    if w.distogram:
        losses["distogram"] = distogram_loss(out["distogram_logits"], true, mask)
    if w.direction_bins:
        losses["direction_bins"] = direction_classification_loss(out["direction_logits"], true, mask)
    if "sequence_logits" in out:
        losses["inverse_folding"] = inverse_folding_loss(out["sequence_logits"], batch["aa"], mask)
    losses["commitment"] = out["commitment"]
    if w.fape:
        losses["fape"] = backbone_fape_loss(out["rot"], out["trans"], pred, true, mask, t.fape_clamp)
    losses["total"] = sum(getattr(w, k) * v for k, v in losses.items())
    return losses


# --- weights between the two sides -------------------------------------------------------------------


def torch_state(model) -> dict[str, np.ndarray]:
    """Parameters and codebook buffers by name, as numpy copies."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def jax_to_torch_names(params: Mapping, codebook: Mapping, cfg_encoder: EncoderConfig,
                       cfg_decoder: DecoderConfig) -> dict[str, np.ndarray]:
    """The JAX stage-1 state (params {"encoder", "decoder", "code_proj"} and the codebook
    collection) under the torch module's names, through the weight conversion's own tables."""
    enc = variables_to_state({"params": params["encoder"], "codebook": codebook["encoder"]}, encoder_rows(cfg_encoder), [])
    rows, stacked = decoder_rows(cfg_decoder)
    dec = variables_to_state({"params": params["decoder"]}, rows, stacked)
    return {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()},
            "code_proj": np.asarray(params["code_proj"])}


def torch_to_jax(state: Mapping[str, np.ndarray], cfg_encoder: EncoderConfig, cfg_decoder: DecoderConfig) -> tuple[dict, dict]:
    """The torch module's state -> (JAX params, JAX codebook collection) for the stage-1 trainer."""
    strip = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    enc = state_to_variables(strip("encoder."), encoder_rows(cfg_encoder), [], f"a structure encoder of {cfg_encoder}")
    rows, stacked = decoder_rows(cfg_decoder)
    dec = state_to_variables(strip("decoder."), rows, stacked, f"a structure decoder of {cfg_decoder}")
    params = {"encoder": enc["params"], "decoder": dec["params"], "code_proj": np.asarray(state["code_proj"], np.float32)}
    return params, {"encoder": enc["codebook"]}


def decay_flags(params: Mapping, codebook: Mapping, no_decay_patterns: tuple[str, ...], cfg_encoder: EncoderConfig,
                cfg_decoder: DecoderConfig) -> dict[str, bool]:
    """Per torch parameter name: does AdamW decay it, by the JAX optimizer's mask mapped through
    the weight conversion (so the two sides cannot disagree on a name)."""
    import jax

    from esm3_jax.train.optim import weight_decay_mask

    mask = weight_decay_mask(params, no_decay_patterns)
    as_float = jax.tree.map(lambda p, m: np.full(np.shape(p), float(m), np.float32), params, mask)
    zeros = jax.tree.map(lambda c: np.zeros(np.shape(c), np.float32), codebook)
    flags = {}
    for name, a in jax_to_torch_names(as_float, zeros, cfg_encoder, cfg_decoder).items():
        if ".codebook." in name:
            continue
        if np.any(a != a.flat[0]):
            raise ValueError(f"{name}: its elements come from JAX leaves with different weight-decay flags")
        flags[name] = bool(a.flat[0])
    return flags


# --- the train step -------------------------------------------------------------------------------------


def torch_batch(host: Mapping[str, np.ndarray]) -> dict:
    torch = _import_torch()
    return {k: torch.from_numpy(np.ascontiguousarray(v.astype(np.int64) if v.dtype.kind in "iu" else v))
            for k, v in host.items()}


class TorchStage1Step:
    """forward + losses + backward + clip + AdamW + EMA codebook step, eager or under
    torch.compile (forward and losses compiled as one function, the EMA step as another).

    The update is the JAX trainer's: global-norm clipping, AdamW with TrainConfig's betas and eps,
    weight decay on the parameters the JAX mask decays, the learning rate of step k from the
    same schedule function. A parameter the losses do not reach (the pLDDT head) gets a zero
    gradient, as in JAX, so that weight decay still moves it. torch's fused CPU AdamW.
    """

    def __init__(self, model, cfg: VQVAEConfig, decay: Mapping[str, bool], compile: bool, seed: int = 0):
        torch = _import_torch()
        from esm3_jax.train.optim import learning_rate_schedule
        from esm3_jax.train.vqvae.stages import optimizer_config

        oc = optimizer_config(cfg.train)
        self.model = model.train()
        self.settings = cfg.train
        self.encoder_config = cfg.encoder
        self.clip = oc.grad_clip_norm
        self.schedule = learning_rate_schedule(oc)
        named = dict(model.named_parameters())
        if set(named) != set(decay):
            raise ValueError(f"decay flags do not name the module's parameters: {sorted(set(named) ^ set(decay))[:5]}")
        groups = [dict(params=[p for n, p in named.items() if decay[n]], weight_decay=oc.weight_decay),
                  dict(params=[p for n, p in named.items() if not decay[n]], weight_decay=0.0)]
        self.opt = torch.optim.AdamW(groups, lr=float(self.schedule(0)), betas=(oc.b1, oc.b2), eps=oc.eps, fused=True)
        self.params = list(named.values())
        # Gradients that exist from the start: one the losses never reach stays zero (as in JAX)
        # instead of None, which AdamW would skip, weight decay included.
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.generator = torch.Generator().manual_seed(seed)
        settings = cfg.train

        pairwise = bool(settings.loss_weights.distogram or settings.loss_weights.direction_bins)

        def loss_fn(m, b):
            out = stage1_forward(m, b, pairwise)
            return stage1_losses(out, b, settings), (out["z"], out["tokens"], out["has_token"])

        ecfg = cfg.encoder
        ema = lambda cb, z, idx, mask, g: ema_codebook_step(cb, z, idx, mask, ecfg.ema_decay, ecfg.restart_threshold, g)
        if compile:
            # torch 2.13: a second process that loads this graph from inductor's on-disk caches
            # fails replaying an output view ("shape '[94896226937024, 98, 98, 224]' is invalid");
            # compiled afresh it runs. So every run compiles from scratch (the time is reported).
            import torch._functorch.config
            import torch._inductor.config

            torch._functorch.config.enable_autograd_cache = False
            torch._inductor.config.fx_graph_cache = False
        self.loss_fn = torch.compile(loss_fn) if compile else loss_fn
        self.ema = ema  # a few small ops; compiling them would only add a graph and a compile
        self.step_count = 0

    def __call__(self, batch: Mapping) -> dict:
        """One step; returns the loss terms (tensors) and the gradient norm before clipping."""
        torch = _import_torch()
        lr = float(self.schedule(self.step_count))
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=False)
        losses, (z, idx, mask) = self.loss_fn(self.model, batch)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        self.opt.step()
        self.ema(self.model.encoder.codebook, z, idx, mask, self.generator)
        self.step_count += 1
        return {**{k: v.detach() for k, v in losses.items()}, "grad_norm": grad_norm}
