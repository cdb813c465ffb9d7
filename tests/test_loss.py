"""The masked-LM objective and the optimiser, checked against direct numpy computations."""

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from esm3_jax import tokens
from esm3_jax.train import loss as loss_lib
from esm3_jax.train import optim
from esm3_jax.batch import TRACKS
from esm3_jax.train.config import LossWeights, TrainConfig

B, L = 2, 7
SIZES = {"sequence": 64, "structure": 4096, "ss8": 11, "sasa": 19}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    outputs = {
        "sequence_logits": rng.normal(size=(B, L, 64)),
        "structure_logits": rng.normal(size=(B, L, 4096)),
        "secondary_structure_logits": rng.normal(size=(B, L, 11)),
        "sasa_logits": rng.normal(size=(B, L, 19)),
        "function_logits": rng.normal(size=(B, L, 8, 260)),
        "residue_logits": rng.normal(size=(B, L, 1478)) - 2.0,
    }
    batch = {
        "sequence_target": rng.integers(4, 24, (B, L)),
        "structure_target": rng.integers(0, 4096, (B, L)),
        "ss8_target": rng.integers(3, 11, (B, L)),
        "sasa_target": rng.integers(3, 19, (B, L)),
        "function_target": rng.integers(3, 260, (B, L, 8)),
        "residue_annotation_target": np.zeros((B, L, 16), np.int64),
    }
    batch["function_target"][0, 1, 5:] = tokens.FUNCTION_PAD  # three empty slots: no loss there
    ids = batch["residue_annotation_target"]
    ids[0, 1, :3] = [5, 900, 5]  # a duplicate id counts once
    ids[1, 2, :1] = [17]
    ids[1, 3, :2] = [3, 1477]
    for t in TRACKS:
        batch[f"{t}_loss_mask"] = rng.random((B, L)) < 0.6
    batch["residue_annotation_loss_mask"][0, 1] = True
    batch["residue_annotation_loss_mask"][1, 2] = True
    batch["function_loss_mask"][0, 1] = True
    # Make one residue prediction an exact hit: logits >= 0 at exactly the listed ids.
    outputs["residue_logits"][1, 2] = -3.0
    outputs["residue_logits"][1, 2, 17] = 2.0
    outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
    batch = {k: jnp.asarray(v, jnp.bool_ if v.dtype == bool else jnp.int32) for k, v in batch.items()}
    return outputs, batch


def _reference_metrics(outputs, batch):
    """Per-track mean loss and accuracy over masked positions, written the slow obvious way."""
    o = {k: np.asarray(v, np.float64) for k, v in outputs.items()}
    b = {k: np.asarray(v) for k, v in batch.items()}
    ref = {}
    for track, logits_key in [("sequence", "sequence_logits"), ("structure", "structure_logits"),
                              ("ss8", "secondary_structure_logits"), ("sasa", "sasa_logits")]:
        lp = _log_softmax(o[logits_key])
        losses, hits = [], []
        for i in range(B):
            for j in range(L):
                if b[f"{track}_loss_mask"][i, j]:
                    t = b[f"{track}_target"][i, j]
                    losses.append(-lp[i, j, t])
                    hits.append(np.argmax(lp[i, j]) == t)
        ref[track] = (np.mean(losses), np.mean(hits))
    lp = _log_softmax(o["function_logits"])
    losses, hits = [], []
    for i in range(B):
        for j in range(L):
            for s in range(8):
                t = b["function_target"][i, j, s]
                if b["function_loss_mask"][i, j] and t != tokens.FUNCTION_PAD:
                    losses.append(-lp[i, j, s, t])
                    hits.append(np.argmax(lp[i, j, s]) == t)
    ref["function"] = (np.mean(losses), np.mean(hits))
    x = o["residue_logits"]
    losses, hits = [], []
    for i in range(B):
        for j in range(L):
            if b["residue_annotation_loss_mask"][i, j]:
                y = np.zeros(1478)
                for rid in b["residue_annotation_target"][i, j]:
                    if rid != tokens.RESIDUE_PAD:
                        y[rid] = 1.0
                p = 1 / (1 + np.exp(-x[i, j]))
                losses.append(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
                hits.append(np.array_equal(x[i, j] >= 0, y > 0))
    ref["residue_annotation"] = (np.mean(losses), np.mean(hits))
    return ref


def test_per_track_loss_accuracy_perplexity_match_reference(case):
    outputs, batch = case
    weights = LossWeights().as_dict()
    total, metrics = loss_lib.masked_lm_loss(outputs, batch, weights)
    ref = _reference_metrics(outputs, batch)
    for track in TRACKS:
        np.testing.assert_allclose(metrics[f"{track}/loss"], ref[track][0], rtol=1e-5, err_msg=track)
        np.testing.assert_allclose(metrics[f"{track}/accuracy"], ref[track][1], rtol=1e-6, err_msg=track)
        np.testing.assert_allclose(metrics[f"{track}/perplexity"], np.exp(ref[track][0]), rtol=1e-5)
    np.testing.assert_allclose(total, sum(ref[t][0] for t in TRACKS), rtol=1e-5)
    # The hand-built exact hit at (1, 2) is the only residue position predicted exactly.
    assert float(metrics["residue_annotation/accuracy"]) > 0
    # Function counts: 8 slots per masked position, minus the three pad slots at (0, 1).
    assert int(metrics["function/count"]) == 8 * int(np.sum(batch["function_loss_mask"])) - 3


def test_track_weights_and_empty_tracks(case):
    outputs, batch = case
    batch = dict(batch, sasa_loss_mask=jnp.zeros((B, L), bool))  # e.g. the whole track dropped
    w = dict(LossWeights().as_dict(), structure=0.5, ss8=0.0)
    total, metrics = loss_lib.masked_lm_loss(outputs, batch, w)
    ref = _reference_metrics(outputs, batch | {"sasa_loss_mask": np.ones((B, L), bool)})
    expect = sum(w[t] * ref[t][0] for t in TRACKS if t != "sasa")
    np.testing.assert_allclose(total, expect, rtol=1e-5)
    assert np.isnan(metrics["sasa/loss"]) and np.isnan(metrics["sasa/accuracy"])
    assert float(metrics["sasa/count"]) == 0


def test_microbatch_sums_add_up_to_the_full_batch(case):
    outputs, batch = case
    weights = LossWeights().as_dict()
    counts = loss_lib.loss_counts(batch)
    halves = [jax.tree.map(lambda x: x[i : i + 1], (outputs, batch)) for i in range(B)]
    parts = [loss_lib.track_sums(o, b) for o, b in halves]
    summed = jax.tree.map(lambda a, b: a + b, *parts)
    full_total, _ = loss_lib.masked_lm_loss(outputs, batch, weights)
    np.testing.assert_allclose(loss_lib.weighted_loss(summed, counts, weights), full_total, rtol=1e-6)
    np.testing.assert_allclose(
        sum(loss_lib.weighted_loss(p, counts, weights) for p in parts), full_total, rtol=1e-6
    )


def test_bf16_logits_are_scored_in_float32(case):
    outputs, batch = case
    weights = LossWeights().as_dict()
    _, m32 = loss_lib.masked_lm_loss(outputs, batch, weights)
    _, m16 = loss_lib.masked_lm_loss(jax.tree.map(lambda x: x.astype(jnp.bfloat16), outputs), batch, weights)
    for t in TRACKS:
        np.testing.assert_allclose(m16[f"{t}/loss"], m32[f"{t}/loss"], rtol=2e-2)


def test_weight_decay_mask_on_the_model_parameters():
    """Decay every weight matrix; exempt norms, biases, embedding tables and the geometric scales."""
    from esm3_jax.model.config import ModelConfig
    from esm3_jax.model.esm3 import ESM3
    from esm3_jax.batch import example_inputs

    params = jax.eval_shape(
        lambda: ESM3(ModelConfig()).init(jax.random.PRNGKey(0), **example_inputs(1, 8))["params"])
    mask = optim.weight_decay_mask(params, TrainConfig().no_decay_patterns)
    decayed, exempt = set(), set()
    for path, v in jax.tree_util.tree_leaves_with_path(mask):
        (decayed if v else exempt).add(optim.param_path(path))
    leaf = lambda name: name.rsplit("/", 1)[-1]
    assert {leaf(n) for n in decayed} == {"qkv", "out", "up", "down", "dense", "proj", "plddt_proj",
                                          "per_res_plddt_proj"}
    assert "trunk/blocks/block/ffn/up" in decayed and "structure_head/out" in decayed
    for name in exempt:
        assert name.endswith(("bias", "scale", "_embed")), name
    assert "encoder/structure_embed" in exempt and "final_norm/scale" in exempt


def test_adamw_decays_only_masked_params_and_clips():
    cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5, grad_clip_norm=1e-6,
                      min_lr_ratio=1.0)
    tx = optim.make_optimizer(cfg)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Zero gradient: only weight decay moves the kernel (lr * wd * p); the bias has no decay.
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    # A huge gradient is clipped to global norm 1e-6 before Adam: Adam's normalised step is the same
    # for any gradient scale, so compare the clipped gradient directly.
    clip = optax.clip_by_global_norm(1e-6)
    g = {"a": jnp.full((3,), 1e3)}
    clipped, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(optax.tree.norm(clipped), 1e-6, rtol=1e-5)


def test_learning_rate_schedule_shape():
    cfg = TrainConfig(steps=110, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    lr = optim.learning_rate_schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(lr(110), 1e-4, rtol=1e-6)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))
