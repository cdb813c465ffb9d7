"""The `esm3-jax` command. Thin: each verb lives in the module that does the work.

A verb's module defines `add_cli_arguments(parser)` and `cli_main(args) -> int` (or, written
"module:NAME", the module's attribute NAME does, for a module serving two verbs); it is imported
only when that verb runs, so `esm3-jax --help` is instant and one verb's dependencies never
slow down another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "forward": ("esm3_jax.inference.forward", "batched forward pass of a checkpoint over an .npz of tokens"),
    "generate": ("esm3_jax.data.design:GENERATE_VERB", "iterative unmasking (ESM3 generation): fill one track of an .npz batch, or design proteins from prompts"),
    "fold": ("esm3_jax.inference.tasks:FOLD_VERB", "sequences -> structure tokens -> PDBs with pLDDT, pTM (and RMSD/LDDT/TM against --native)"),
    "inverse-fold": ("esm3_jax.inference.tasks:INVERSE_FOLD_VERB", "a backbone's coordinates -> designed sequences (FASTA), with sequence recovery"),
    "predict-function": ("esm3_jax.data.function_prediction", "function keywords, residue annotations (and InterPro ids with a function decoder) over residue ranges"),
    "convert": ("esm3_jax.compat.convert", "PyTorch state dict (official release format) <-> esm3-jax checkpoint"),
    "preprocess": ("esm3_jax.data.preprocess_cli", "FASTA / jsonl / PDB+mmCIF folders / label files -> ArrayRecord shards"),
    "split": ("esm3_jax.data.split", "FASTA / jsonl -> train/valid/test inputs by MMseqs2 sequence clusters (no near-duplicates across splits)"),
    "build-function-vocab": ("esm3_jax.data.function_vocab", "function keyword vocabulary, IDF and LSH hyperplanes from text"),
    "train": ("esm3_jax.train.loop", "pretrain (or resume) ESM3 as a config says: sharded, checkpointed, logged"),
    "checkpoint-info": ("esm3_jax.train.checkpoint", "a training checkpoint's step, config summary and params fingerprint"),
    "aot": ("esm3_jax.train.aot", "compile the train step for a TPU topology without a TPU: memory, FLOPs, fits"),
    "bench": ("esm3_jax.bench.cli", "measure speed side by side with the reference and the matmul peak"),
    "tokenize-structure": ("esm3_jax.data.structure_tokens:TOKENIZE_VERB", "PDB/mmCIF chains -> VQ-VAE structure tokens (.npz, one array per chain)"),
    "decode-structure": ("esm3_jax.data.structure_tokens:DECODE_VERB", "structure tokens (.npz) -> backbone or all-atom PDBs with pLDDT, and pTM"),
    "train-vqvae": ("esm3_jax.train.vqvae.run", "train the VQ-VAE structure tokenizer from a configs/vqvae_*.yaml"),
    "evaluate": ("esm3_jax.eval.nll", "per-track NLL, perplexity, accuracy of a checkpoint on a split: at the training noise and under conditioning"),
    "scaling": ("esm3_jax.eval.scaling", "scaling ladder: train model sizes to their budgets, held-out NLL vs FLOPs, power-law fit and plot"),
    "plot-metrics": ("esm3_jax.eval.plot_metrics", "loss curves of one or more runs' metrics.csv as a PNG (needs matplotlib)"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="esm3-jax",
        description="ESM3 in JAX/Flax. Run `esm3-jax VERB --help` for a verb's options.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a verb. Called without argv (as the program), it first moves under tcmalloc when the
    machine has it (runtime/allocator.py) and turns on XLA's persistent compilation cache
    (runtime/compile_cache.py); called with argv (in-process, as tests do), neither."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        parser = _top_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown verb '{argv[0]}'; choose from {', '.join(VERBS)}")
        parser.print_help()
        return 0 if argv else 2
    verb = argv[0]
    if as_program and not any(a in ("-h", "--help") for a in argv[1:]):
        from esm3_jax.runtime.allocator import reexec_under_tcmalloc
        from esm3_jax.runtime.compile_cache import enable_by_default

        reexec_under_tcmalloc()
        enable_by_default()  # before any verb module imports JAX, which reads it then
    # Before any verb module imports JAX (and JAX loads libtpu, when installed).
    from esm3_jax.runtime.tpu_env import quiet_libtpu_without_tpu

    quiet_libtpu_without_tpu()
    module_name, _, attribute = VERBS[verb][0].partition(":")
    module = importlib.import_module(module_name)
    if attribute:
        module = getattr(module, attribute)
    parser = argparse.ArgumentParser(prog=f"esm3-jax {verb}", description=VERBS[verb][1])
    module.add_cli_arguments(parser)
    if getattr(module, "ACCEPTS_EXTRA_ARGS", False):  # options it passes on to another program
        args, args.extra_args = parser.parse_known_args(argv[1:])
    else:
        try:
            # key=value overrides may sit on both sides of options (`--config C a=1 --eval-only
            # b=2`); plain parse_args takes only the first run of positionals and rejects the rest.
            args = parser.parse_intermixed_args(argv[1:])
        except TypeError:  # a verb with sub-commands (bench), which intermixed parsing does not support
            args = parser.parse_args(argv[1:])
    try:
        return int(module.cli_main(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Bad input of any kind: one clear line, no traceback.
        print(f"esm3-jax {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
