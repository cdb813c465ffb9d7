"""The PyTorch peer of the train step (bench/torch_peer.py): its port of the objective and its
weight-decay mask against esm3-jax's own, so that `bench train-step --against-torch` times the
same computation on both sides (the bench itself also checks the first step's loss and update)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.batch import synthetic_train_batch
from esm3_jax.train import loss as loss_lib
from tests.reference import build_reference_esm3, import_reference

SHAPES = {"sequence_logits": (64,), "structure_logits": (4096,), "secondary_structure_logits": (11,),
          "sasa_logits": (19,), "function_logits": (T.FUNCTION_DEPTH, 260), "residue_logits": (1478,)}


def test_torch_loss_port_matches_train_loss():
    torch, _ = import_reference()
    from esm3_jax.bench import torch_peer

    B, L = 2, 24
    batch = synthetic_train_batch(B, L, mask_rate=0.4, seed=3)
    batch["residue_annotation_target"][0, 3, :3] = [7, 7, 9]  # a repeated id counts once
    rng = np.random.default_rng(0)
    logits = {k: (3 * rng.normal(size=(B, L, *s))).astype(np.float32) for k, s in SHAPES.items()}
    weights = {"sequence": 1.0, "structure": 0.5, "ss8": 2.0, "sasa": 0.0, "function": 1.5, "residue_annotation": 0.7}
    ours, _ = loss_lib.masked_lm_loss({k: jnp.asarray(v) for k, v in logits.items()},
                                      {k: jnp.asarray(v) for k, v in batch.items()}, weights)
    tb = torch_peer.torch_batch(batch)
    theirs = torch_peer.torch_weighted_loss(
        torch_peer.torch_track_sums({k: torch.from_numpy(v) for k, v in logits.items()}, tb),
        torch_peer.torch_loss_counts(tb), weights)
    assert abs(float(theirs) - float(ours)) <= 1e-5 * abs(float(ours))


def test_decay_flags_follow_the_jax_mask_by_name():
    import_reference()
    from esm3_jax.bench import torch_peer
    from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
    from esm3_jax.train.config import load_config, resolve_config_path

    model, state = build_reference_esm3(64, 4, 8, 2)
    cfg = load_config(resolve_config_path("tiny"))
    model_cfg = infer_esm3_config(state, 4)
    params = torch_to_esm3_params(state, model_cfg)
    flags = torch_peer.decay_flags(params, cfg.train.no_decay_patterns, model_cfg)
    assert {n for n, _ in model.named_parameters()} <= set(flags)  # every parameter the optimizer sees
    assert flags["transformer.blocks.0.attn.layernorm_qkv.1.weight"]  # a projection: decayed
    assert not flags["encoder.sequence_embed.weight"]  # embeddings, norms and biases are not
    assert not flags["transformer.blocks.0.attn.layernorm_qkv.0.weight"]
    assert not any(v for k, v in flags.items() if k.endswith(".bias"))
