"""`esm3-jax bench ...`: speed measured side by side, never assumed.

Every benchmark prints (1) esm3-jax against the reference implementation on identical config,
weights and inputs, measured in the same process, and (2) model FLOP utilisation against the
machine's matmul rate, measured in the same run with the same dtype. One module per benchmark:
forward.py, train_step.py, vqvae.py, vqvae_step.py, data.py, generate.py, preprocess.py (local vs Beam);
vqvae_handedness.py measures what the VQ-VAE's losses pull toward, not speed.
"""

from __future__ import annotations

import argparse



def _add_torch_peer_arguments(parser, what: str) -> None:
    """--against-torch and --torch-modes, shared by the benches that have a PyTorch peer."""
    parser.add_argument("--against-torch", action="store_true", help=f"time the PyTorch alternative alongside: {what}")
    parser.add_argument("--torch-modes", nargs="+", default=["eager", "compile"], choices=("eager", "compile"),
                        help="with --against-torch: torch eager mode and/or torch.compile (default both)")

def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    f = sub.add_parser("forward", help="ESM3 forward pass vs the reference (tokens/s, ratio, MFU)")
    f.add_argument("--config", default="mid", help="config name under configs/ or a path (default mid)")
    f.add_argument("--batch", type=int, default=4)
    f.add_argument("--length", type=int, default=256)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--no-reference", action="store_true", help="skip the reference (no torch needed)")
    t = sub.add_parser("train-step", help="full ESM3 train step: FLOPs per step, step time, MFU")
    t.add_argument("--config", default="small")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--length", type=int, default=512)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--against", nargs="+", metavar="KEY=VALUE",
                   help="also time a step with these overrides, alternating with the first in one process")
    _add_torch_peer_arguments(t, "the reference ESM3, same weights, batch, loss and AdamW")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. model.remat=full")
    v = sub.add_parser("vqvae", help="VQ-VAE encoding and decoding vs the reference (residues/s, ratios)")
    v.add_argument("--chains", type=int, default=8)
    v.add_argument("--length", type=int, default=256)
    v.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("vqvae-step", help="VQ-VAE stage-1 train step on real crops (residues/s); with --against-torch vs a "
                                          "torch loop over the reference encoder and decoder")
    s.add_argument("--config", default="configs/vqvae_small.yaml", help="a train-vqvae YAML (default configs/vqvae_small.yaml)")
    s.add_argument("--batch", type=int, default=None, help="crops per step (default the config's train.batch_size)")
    s.add_argument("--length", type=int, default=None, help="crop length (default the config's train.crop_length)")
    s.add_argument("--steps", type=int, default=5, help="timed rounds, one step of each side per round")
    s.add_argument("--chains", type=int, default=32, help="crops come from the first N training chains of the data folder")
    s.add_argument("--batches", type=int, default=4, help="distinct batches, used in turn")
    _add_torch_peer_arguments(s, "the reference encoder and decoder, same weights, crops, losses, AdamW")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. train.loss_weights.distogram=0")
    h = sub.add_parser("vqvae-handedness", help="which VQ-VAE loss mixes fold a chain as its mirror image (descent on coordinates)")
    h.add_argument("--chain", default="mdanalysis_mmcif/5PTI.cif.gz:A",
                   help="FILE:CHAIN, a path or one relative to the shared structures (default 5PTI:A)")
    h.add_argument("--mixes", nargs="+", default=None, help="loss mixes (default all; names in bench/vqvae_handedness.py)")
    h.add_argument("--starts", type=int, default=8)
    h.add_argument("--steps", type=int, default=400)
    g = sub.add_parser("generate", help="batch generation vs the reference's batch_generate (proteins/s, ratio, tokens)")
    g.add_argument("--config", default="small", help="config name under configs/ or a path (default small; tiny for a quick run)")
    g.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="one protein per length, BOS/EOS included (default 8 proteins, 64 to 256)")
    g.add_argument("--num-steps", type=int, default=16)
    g.add_argument("--track", default="sequence", choices=("sequence", "structure"))
    g.add_argument("--sampling", default="deterministic", choices=("deterministic", "default"),
                   help="deterministic: entropy strategy, temperature 0, no annealing (tokens comparable); "
                        "default: the reference GenerationConfig's (random strategy, temperature 1, annealing)")
    g.add_argument("--repeats", type=int, default=2, help="alternating timed rounds after the first call")
    d = sub.add_parser("data", help="input pipeline tokens/s next to the train step's, same run")
    d.add_argument("--data", required=True, help="a folder of shards written by `esm3-jax preprocess`")
    d.add_argument("--config", default="small")
    d.add_argument("--batches", type=int, default=50)
    pre = sub.add_parser("preprocess", help="preprocessing structures/s and sequences/s per worker: local path vs Beam")
    pre.add_argument("--structures", default="demo_data/structures", help="a folder of PDB/mmCIF files")
    pre.add_argument("--sequences", default="demo_data/pdb_chains_train.jsonl.gz", help="a FASTA or jsonl file")
    pre.add_argument("--n-structures", type=int, default=100, help="the first N structure files")
    pre.add_argument("--n-sequences", type=int, default=3000, help="the first N sequences")
    pre.add_argument("-j", "--workers", type=int, default=2, help="worker processes, each path")
    pre.add_argument("--repeats", type=int, default=2, help="alternating rounds (median reported)")
    pre.add_argument("--beam-mode", default="multi_processing", choices=("multi_processing", "multi_threading"),
                     help="the DirectRunner's workers: processes, or threads of this process")


def cli_main(args: argparse.Namespace) -> int:
    if args.what == "forward":
        from esm3_jax.bench.forward import bench_forward

        bench_forward(args.config, args.batch, args.length, args.repeats, not args.no_reference)
    elif args.what == "train-step":
        from esm3_jax.bench.train_step import bench_train_step, bench_train_step_against_torch

        if args.against_torch:
            if args.against:
                raise ValueError("--against-torch and --against cannot be combined")
            bench_train_step_against_torch(args.config, args.batch, args.length, args.steps, tuple(args.overrides),
                                           tuple(args.torch_modes))
            return 0
        bench_train_step(args.config, args.batch, args.length, args.steps, tuple(args.overrides),
                         against=tuple(args.against) if args.against else None)
    elif args.what == "vqvae":
        from esm3_jax.bench.vqvae import bench_vqvae

        bench_vqvae(args.chains, args.length, repeats=args.repeats)
    elif args.what == "vqvae-step":
        from esm3_jax.bench.vqvae_step import bench_vqvae_step

        bench_vqvae_step(args.config, args.batch, args.length, args.steps, tuple(args.overrides), args.against_torch,
                         tuple(args.torch_modes), n_chains=args.chains, n_batches=args.batches)
    elif args.what == "vqvae-handedness":
        from esm3_jax.bench.vqvae_handedness import MIXES, bench_vqvae_handedness

        bench_vqvae_handedness(args.chain, tuple(args.mixes or MIXES), args.starts, args.steps)
    elif args.what == "generate":
        from esm3_jax.bench.generate import DEFAULT_LENGTHS, bench_generate

        bench_generate(args.config, tuple(args.lengths or DEFAULT_LENGTHS), args.num_steps, args.track,
                       args.sampling, args.repeats)
    elif args.what == "data":
        from esm3_jax.bench.data import bench_data

        bench_data(args.data, args.config, args.batches)
    elif args.what == "preprocess":
        from esm3_jax.bench.preprocess import bench_preprocess

        bench_preprocess(args.structures, args.sequences, workers=args.workers, n_structures=args.n_structures,
                         n_sequences=args.n_sequences, repeats=args.repeats, beam_mode=args.beam_mode)
    return 0
