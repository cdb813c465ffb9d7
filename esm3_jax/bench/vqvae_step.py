"""`esm3-jax bench vqvae-step`: the VQ-VAE stage-1 train step (encoder + EMA codebook + decoder +
the geometric losses, train/vqvae/stages.py) on real crops from the shared structures, and with
--against-torch the PyTorch alternative beside it (bench/vqvae_torch_peer.py: the reference
encoder and decoder with torch ports of what the reference lacks), in eager mode and/or under
torch.compile, alternating rounds in one process."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.train.vqvae.config import VQVAEConfig, load_vqvae_config
from esm3_jax.train.vqvae.data import SHARED_STRUCTURES_DIR, batches, load_split
from esm3_jax.train.vqvae.stages import Stage1, _has_structure

CODE_RTOL = 1e-5
LOSS_ORDER = ("distance", "direction", "distogram", "direction_bins", "inverse_folding", "commitment", "fape", "total")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# The trainer fits the codebook to this many batches of its second data stream (run.py).
FIT_BATCHES = 4


def _real_batches(cfg: VQVAEConfig, n_chains: int, n_batches: int) -> tuple[list[dict], list[dict]]:
    """(n_batches to step on, FIT_BATCHES to fit the codebook to): the trainer's own batches
    (random crops of crop_length, padded) of the first n_chains training chains of the config's
    data folder, from its seed and seed + 1 as run.py draws them."""
    t = cfg.train
    data_dir = Path(t.data_dir) if t.data_dir else SHARED_STRUCTURES_DIR
    chains = load_split(data_dir, "train", n_chains, False, t.max_chain_length)
    draw = lambda seed, n: [_has_structure(b) for b, _ in zip(batches(chains, t.batch_size, t.crop_length, seed), range(n))]
    return draw(t.seed, n_batches), draw(t.seed + 1, FIT_BATCHES)


def _weights_line(cfg: VQVAEConfig) -> str:
    t = cfg.train
    w = ", ".join(f"{k} {v:g}" for k, v in vars(t.loss_weights).items() if v)
    return (f"loss weights: {w} (commitment on top of the codebook's {cfg.encoder.commitment_weight:g}); "
            f"distance clamp {t.distance_clamp:g} Å^2, direction clamp {t.direction_clamp:g}")


def _jax_state_from_torch(trainer: Stage1, model, fit: list[dict], seed: int) -> dict:
    """The stage-1 trainer's state holding the torch module's weights, the codebook fitted to the
    `fit` batches (the trainer's data-dependent init) and fresh AdamW moments."""
    from esm3_jax.bench import vqvae_torch_peer as peer
    from esm3_jax.model.codebook import COLLECTION

    cfg = trainer.cfg
    params, codebook = peer.torch_to_jax(peer.torch_state(model), cfg.encoder, trainer.model.decoder_config)
    args = (fit[0]["coords"], fit[0]["residue_index"], fit[0]["aa"], fit[0]["valid"])
    rngs = {"params": jax.random.PRNGKey(0), COLLECTION: jax.random.PRNGKey(1)}
    expected = jax.eval_shape(lambda: nn.unbox(trainer.model.init(rngs, *args)))
    for name, ours, theirs in (("params", params, expected["params"]), ("codebook", codebook, expected[COLLECTION])):
        shapes = lambda tree: jax.tree_util.tree_map_with_path(lambda p, x: (jax.tree_util.keystr(p), tuple(np.shape(x))), tree)
        if jax.tree.leaves(shapes(ours)) != jax.tree.leaves(shapes(theirs)):
            raise RuntimeError(f"the converted {name} do not have the stage-1 trainer's layout")
    params = jax.device_put(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "codebook": jax.device_put(codebook),
             "opt_state": trainer.tx.init(params), "rng": jax.random.fold_in(jax.random.PRNGKey(seed), 1)}
    return trainer.fit_codebook(state, fit, jax.random.PRNGKey(seed + 1))


def _copy_codebook_to_torch(state: dict, model) -> None:
    import torch

    cb = state["codebook"]["encoder"]["codebook"]
    ref = model.encoder.codebook
    with torch.no_grad():
        for buf, key in ((ref.embeddings, "embeddings"), (ref.N, "cluster_size"), (ref.z_avg, "embed_sum")):
            buf.copy_(torch.from_numpy(np.array(cb[key], np.float32)))


def same_start(trainer: Stage1, fit: list[dict]):
    """(JAX trainer state, torch peer module) holding the same weights: the reference modules'
    random init (seeded by train.seed), converted, and the codebook the trainer fits to the `fit`
    batches, copied into the reference codebook's buffers.

    Fit the codebook to other batches than the first step's, as the trainer does: codes drawn
    from a batch's own vectors (plus noise of ~1e-3) sit at near-ties for those vectors, and fp32
    rounding then picks either code, differently on the two sides."""
    from esm3_jax.bench import vqvae_torch_peer as peer

    cfg = trainer.cfg
    peer.check_portable(cfg)
    model = peer.build_torch_stage1(cfg, cfg.train.seed)
    state = _jax_state_from_torch(trainer, model, fit, cfg.train.seed)
    _copy_codebook_to_torch(state, model)
    return state, model


def first_steps(trainer: Stage1, state: dict, model, host: list[dict], xs: list[dict], modes: tuple[str, ...]):
    """One step of the JAX trainer and of a torch peer per mode (each on its own copy of `model`),
    all from the same start on batch 0. Returns (JAX state after it, JAX metrics, JAX first-step
    seconds, the peers, per mode: its losses, their relative differences to JAX's, the share of
    parameter updates that agree (bench/torch_peer.update_agreement) and the codebook's largest
    difference after the EMA step, relative to its largest value)."""
    from esm3_jax.bench import torch_peer
    from esm3_jax.bench import vqvae_torch_peer as peer

    cfg, dec_cfg = trainer.cfg, trainer.model.decoder_config
    names = lambda st: peer.jax_to_torch_names(jax.device_get(st["params"]), jax.device_get(st["codebook"]),
                                               cfg.encoder, dec_cfg)
    before = names(state)
    decay = peer.decay_flags(state["params"], state["codebook"], _no_decay(cfg), cfg.encoder, dec_cfg)
    (state, m), jax_s = _timed(lambda: jax.block_until_ready(trainer.step_fns[True](state, xs[0])))
    jax_first = {k: float(v) for k, v in m.items()}
    jax_after = names(state)
    lr0 = _lr(cfg, 0)
    tb0 = peer.torch_batch(host[0])
    peers, checks = {}, {}
    for mode in modes:
        # Each mode trains its own copy, taken before any torch step: every first step starts alike.
        peers[mode] = peer.TorchStage1Step(copy.deepcopy(model), cfg, decay, compile=mode == "compile", seed=cfg.train.seed)
        first, first_s = _timed(lambda: peers[mode](tb0))
        first = {k: float(v) for k, v in first.items()}
        after = peer.torch_state(peers[mode].model)
        is_param = {n for n, _ in peers[mode].model.named_parameters()}
        agreement = torch_peer.update_agreement({k: before[k] for k in is_param}, jax_after, after, lr0)
        # Per code: its vector, EMA count and EMA sum, each against the largest of its kind.
        code_diff = np.max([np.abs(after[k] - jax_after[k]).reshape(len(after[k]), -1).max(1) / np.abs(jax_after[k]).max()
                            for k in after if ".codebook." in k], axis=0)
        rel = {k: abs(first[k] - jax_first[k]) / max(abs(jax_first[k]), 1e-12) for k in first}
        checks[mode] = dict(losses=first, relative_differences=rel, first_step_s=first_s,
                            codebook_relative_difference=float(code_diff.max()),
                            codes_agree=float(np.mean(code_diff <= CODE_RTOL)), **agreement)
    return state, jax_first, jax_s, peers, checks


def bench_vqvae_step(config: str, batch: int | None = None, length: int | None = None, steps: int = 5,
                     overrides: tuple[str, ...] = (), against_torch: bool = False,
                     torch_modes: tuple[str, ...] = ("eager", "compile"), n_chains: int = 32, n_batches: int = 4,
                     loss_rtol: float = 1e-4, min_update_agreement: float = 0.999,
                     min_codes_agree: float = 0.99) -> dict:
    """Time the JAX stage-1 step (the trainer's own jitted step, quantising, EMA codebook on) on
    real crops; with against_torch, also the torch peer on the same crops, the same weights (the
    reference modules' random init, converted) and the same codebook (fitted by the trainer to
    FIT_BATCHES batches of its second data stream, as run.py fits it), fp32, torch on as many threads as this process may use.

    The first step of each side is checked before anything is timed: every loss term to
    `loss_rtol`, the share of parameter elements whose AdamW updates agree to 1% of the learning
    rate (at least `min_update_agreement`) and the share of codes (vector, EMA count and sum)
    that agree after the EMA step to CODE_RTOL (at least `min_codes_agree`: a vector at a
    near-tie between two codes may take either, moving both). Then `steps`
    rounds, one step of each side per round on the round's batch (the n_batches crops in turn).
    """
    modes = tuple(torch_modes) if against_torch else ()
    if any(m not in ("eager", "compile") for m in modes) or (against_torch and not modes):
        raise ValueError(f"torch modes must be among eager, compile; got {torch_modes}")
    if steps < 1 or n_batches < 1 or n_chains < 1:
        raise ValueError("steps, batches and chains must be positive")
    sizes = [f"train.batch_size={batch}"] if batch else []
    sizes += [f"train.crop_length={length}"] if length else []
    # warmup_steps=0: the first step runs at the peak learning rate, so that the check after it
    # compares real updates (a warm-up from 0 would move nothing).
    cfg = load_vqvae_config(config, [*overrides, *sizes, "train.warmup_steps=0"])
    t = cfg.train
    if against_torch:
        from esm3_jax.bench.vqvae_torch_peer import check_portable

        check_portable(cfg)  # before the data and the compiles
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host, fit_host = _real_batches(cfg, n_chains, n_batches)
    residues = t.batch_size * t.crop_length
    real = float(np.mean([b["has_structure"].mean() for b in host]))
    xs = [{k: jnp.asarray(v) for k, v in b.items()} for b in host]
    trainer = Stage1(cfg)
    step = trainer.step_fns[True]

    torch_line = ""
    if against_torch:
        import torch

        from esm3_jax.bench import vqvae_torch_peer as peer

        torch.set_num_threads(threads)
        state, model = same_start(trainer, [{k: jnp.asarray(v) for k, v in b.items()} for b in fit_host])
        torch_line = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    else:
        state = trainer.init(xs[0], jax.random.PRNGKey(t.seed))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(state["params"]))
    e, d = cfg.encoder, cfg.decoder
    print(f"config {config}: encoder {e.n_layers} x {e.d_model} ({e.v_heads} geometric heads, {e.knn} neighbours), "
          f"codebook {e.n_codes} x {e.d_out}, decoder {d.n_layers} x {d.d_model}, {n_params:,} params; batch "
          f"{t.batch_size} x {t.crop_length} real crops ({n_batches} batches of {n_chains} training chains, "
          f"{100 * real:.0f}% of slots real residues), float32; JAX {jax.__version__} ({jax.devices()[0].platform})"
          + torch_line)
    print(_weights_line(cfg))

    if against_torch:
        state, jax_first, jax_compile_s, peers, checks = first_steps(trainer, state, model, host, xs, modes)
        _print_first_steps(jax_first, checks, jax_compile_s)
        for mode, c in checks.items():
            worst = max(v for k, v in c["relative_differences"].items() if k != "grad_norm")
            if (worst > loss_rtol or c["relative_differences"]["grad_norm"] > 10 * loss_rtol
                    or c["update_agreement"] < min_update_agreement or c["codes_agree"] < min_codes_agree):
                raise RuntimeError(f"torch {mode} and esm3-jax disagree on the first step (largest loss difference "
                                   f"{worst:.1e}, updates agreeing {100 * c['update_agreement']:.3f}%, codes agreeing "
                                   f"{100 * c['codes_agree']:.2f}%): no ratios")
        tb = [peer.torch_batch(b) for b in host]
    else:
        peers, checks = {}, {}
        (state, m), jax_compile_s = _timed(lambda: jax.block_until_ready(step(state, xs[0])))
        jax_first = {k: float(v) for k, v in m.items()}
        print(f"first step (compile included): {jax_compile_s:.1f} s; loss {jax_first['total']:.6f}")

    # One untimed step more each: the first run after compiling also faults in fresh pages, and
    # torch.compile may specialise again on the second call.
    state, m = step(state, xs[1 % n_batches])
    jax.block_until_ready(m)
    for p in peers.values():
        p(tb[1 % n_batches])
    times: dict[str, list[float]] = {"esm3-jax": [], **{f"torch {mode}": [] for mode in peers}}
    for r in range(steps):
        i = (r + 2) % n_batches
        (state, m), dt = _timed(lambda: jax.block_until_ready(step(state, xs[i])))
        times["esm3-jax"].append(dt)
        for mode, p in peers.items():
            times[f"torch {mode}"].append(_timed(lambda: p(tb[i]))[1])
    results = {}
    for name, ts in times.items():
        sec = float(np.median(ts))
        results[name] = dict(step_s=sec, residues_per_s=residues / sec, times=ts)
        extra = f", first step incl. compile {jax_compile_s:.1f} s" if name == "esm3-jax" else ""
        if name.startswith("torch"):
            extra = f", first step{' incl. compile' if 'compile' in name else ''} {checks[name[6:]]['first_step_s']:.1f} s"
        print(f"{name:14s}: {sec:7.3f} s/step (median of {steps}{extra}), {residues / sec:8.1f} residues/s")
    jax_s = results["esm3-jax"]["step_s"]
    for mode in peers:
        ts = times[f"torch {mode}"]
        ratio = results[f"torch {mode}"]["step_s"] / jax_s
        per_round = [b / a for a, b in zip(times["esm3-jax"], ts)]
        results[f"torch {mode}"].update(speedup=ratio, speedup_per_round=per_round, **checks[mode])
        print(f"speedup esm3-jax / torch {mode}: {ratio:.2f}x (medians), {float(np.median(per_round)):.2f}x (median of the "
              f"rounds' ratios); per round: " + " ".join(f"{r:.2f}" for r in per_round))
    results["esm3-jax"].update(first=jax_first, compile_s=jax_compile_s)
    return dict(results=results, residues_per_step=residues, threads=threads)


def _no_decay(cfg: VQVAEConfig) -> tuple[str, ...]:
    from esm3_jax.train.vqvae.stages import optimizer_config

    return optimizer_config(cfg.train).no_decay_patterns


def _lr(cfg: VQVAEConfig, step: int) -> float:
    from esm3_jax.train.optim import learning_rate_schedule
    from esm3_jax.train.vqvae.stages import optimizer_config

    return float(learning_rate_schedule(optimizer_config(cfg.train))(step))


def _print_first_steps(jax_first: dict, checks: dict, jax_compile_s: float) -> None:
    modes = list(checks)
    names = [k for k in LOSS_ORDER if k in jax_first] + ["grad_norm"]
    print("first step (same weights, codebook and crops):")
    print(f"  {'term':16s} {'esm3-jax':>14s}" + "".join(f" {'torch ' + m:>14s} {'rel. diff':>9s}" for m in modes))
    for k in names:
        row = f"  {k:16s} {jax_first[k]:14.6f}"
        for mode in modes:
            c = checks[mode]
            row += f" {c['losses'][k]:14.6f} {c['relative_differences'][k]:9.1e}"
        print(row)
    for mode in modes:
        c = checks[mode]
        print(f"  torch {mode}: after AdamW, {100 * c['update_agreement']:.3f}% of parameter updates agree to 1% of lr "
              f"(largest difference {c['update_max_diff_in_lr']:.2f} lr); after the EMA step "
              f"{100 * c['codes_agree']:.2f}% of codes agree to {CODE_RTOL:g} (largest difference "
              f"{c['codebook_relative_difference']:.1e}, relative); first step {c['first_step_s']:.1f} s"
              + (" incl. compile" if mode == "compile" else ""))
