"""`esm3-jax preprocess`: the verb. The local path is preprocess.py; with `--runner`, the Beam path
(preprocess_beam.py, the one module that imports apache_beam, loaded only then)."""

from __future__ import annotations

import argparse
import os

from esm3_jax.data import sources as src
from esm3_jax.data import tokenize
from esm3_jax.data.preprocess import Settings, reason_summary, run, settings_from_args


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+",
        help="FASTA / jsonl files (.gz ok), structure files, or folders of PDB/mmCIF files; kind by extension",
    )  # fmt: skip
    parser.add_argument("-o", "--out", required=True, help="output folder (shards, manifest.json, rejects.jsonl)")
    parser.add_argument(
        "--residue-labels", action="append", default=[],
        help="per-residue label file (`>name` then `chain resnum aa 0|1` lines, ScanNet PPBS style); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--ppi-annotation-id", type=int, default=src.ParseOptions.ppi_annotation_id,
        help="residue-annotation id (4..1477) given to residues labelled 1 in --residue-labels files: a "
        "project-defined label (the release's InterPro site-label table is not part of the esm package)",
    )  # fmt: skip
    parser.add_argument(
        "--function-vocab",
        help="folder from `esm3-jax build-function-vocab`, or of the release's files under their own names; "
        "without it, function labels in the inputs are not tokenized",
    )
    parser.add_argument("--function-from-sccs", action="store_true",
                        help="jsonl rows' `sccs` becomes a whole-protein function label")  # fmt: skip
    parser.add_argument(
        "--scope-des", help="SCOPe dir.des file: its px rows give structure chains function labels (family sccs)"
    )
    parser.add_argument("--structure-encoder", metavar="DIR", help="VQ-VAE checkpoint folder: add structure tokens")
    parser.add_argument(
        "--plddt", choices=("auto", "bfactor", "one"), default="auto",
        help="structures' pLDDT: B-factors of files that look predicted, 1.0 otherwise (auto); always B-factors; "
        "always 1.0",
    )  # fmt: skip
    parser.add_argument("--records-per-shard", type=int, default=Settings.records_per_shard,
                        help="input entries per shard (a structure file is one entry)")  # fmt: skip
    parser.add_argument(
        "--min-length", type=int, default=Settings.min_length,
        help=f"reject proteins with fewer residues (default {Settings.min_length})",
    )  # fmt: skip
    parser.add_argument(
        "--max-unknown-fraction", type=float, default=Settings.max_unknown_fraction,
        help="reject proteins whose fraction of unknown residues (X) is above this "
        f"(default {Settings.max_unknown_fraction}; 1 keeps all)",
    )  # fmt: skip
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="discard an earlier run in --out (otherwise it is resumed)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--runner", choices=("direct", "dataflow", "flink", "spark"),
        help="run as an Apache Beam pipeline on this runner (pip install -e '.[beam]'); same outputs. Beam "
        "pipeline options follow as --name=value (e.g. --project=P --region=R --temp_location=gs://B/tmp); "
        "with direct, -j sets --direct_num_workers",
    )  # fmt: skip
    parser.add_argument(
        "--join", action="store_true",
        help="with --runner: merge the proteins of different inputs that share a record id into one record "
        "(sequence from FASTA, structure from a file, annotations from jsonl/label files); unmatched ids are "
        "kept as they are and counted in manifest.json",
    )  # fmt: skip


# cli.py hands arguments this verb does not know to cli_main as `args.extra_args` (Beam's pipeline
# options pass through unparsed).
ACCEPTS_EXTRA_ARGS = True


def cli_main(args: argparse.Namespace) -> int:
    extra = list(getattr(args, "extra_args", None) or [])
    if args.runner is None and (extra or args.join):
        what = f"unrecognized arguments: {' '.join(extra)}" if extra else "--join"
        raise ValueError(f"{what} (Beam pipeline options and --join go with --runner)")
    if args.runner is not None:
        from esm3_jax.data import preprocess_beam  # the only module that imports apache_beam

        settings = preprocess_beam.settings_from_args(args)
    else:
        settings = settings_from_args(args)
    if settings.structure_encoder:
        tokenize.load_structure_encoder(settings.structure_encoder)  # fail before any work, not in every worker
    if args.runner is not None:
        if args.runner == "direct" and not any(a.startswith("--direct_num_workers") for a in extra):
            extra += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
        manifest = preprocess_beam.run(
            settings, args.out, runner=args.runner, beam_args=extra, join=args.join, overwrite=args.overwrite
        )
    else:
        manifest = run(
            settings, args.out, workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite
        )
    reasons = f" ({reason_summary(manifest)})" if manifest["n_rejected"] else ""
    print(
        f"{manifest['n_records']} records ({manifest['n_tokens']} tokens) in {len(manifest['shards'])} shards; "
        f"{manifest['n_rejected']} rejected{reasons} -> {args.out}"
    )
    return 0
