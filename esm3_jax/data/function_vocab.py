"""`esm3-jax build-function-vocab`: label texts from SCOPe des files and `label<TAB>text` files
(read by sources.py) -> the function-keyword vocabulary, IDF and LSH hyperplanes
(function_tokens.py), saved where preprocess and inference read them."""

from __future__ import annotations

import argparse
import collections

from esm3_jax.data import function_tokens as ft
from esm3_jax.data import sources


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="directory to write the vocabulary, IDF, label map and hyperplanes")
    parser.add_argument(
        "--scope-des", action="append", default=[],
        help="SCOPe dir.des file (.gz ok): one label per family sccs, text = class/fold/superfamily/family names",
    )  # fmt: skip
    parser.add_argument(
        "--label-text", action="append", default=[],
        help="tab-separated file, one `label<TAB>description text` per line; a label may repeat",
    )  # fmt: skip
    parser.add_argument("--min-df", type=int, default=1, help="drop keywords found in fewer labels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random hyperplanes")


def cli_main(args: argparse.Namespace) -> int:
    texts: dict[str, list[str]] = collections.defaultdict(list)
    for path in args.scope_des:
        rows = sources.read_scope_des(path, sources.SCOPE_NAME_LEVELS)
        for label, label_texts in sources.scope_label_texts(rows).items():
            texts[label].extend(label_texts)
    for path in args.label_text:
        for label, text in sources.read_label_text(path):
            texts[label].append(text)
    if not texts:
        raise ft.FunctionVocabError("give at least one --scope-des or --label-text file")
    vocab = ft.build_function_vocab(texts, min_df=args.min_df, seed=args.seed)
    out = ft.save_function_vocab(vocab, args.out_dir)
    print(f"{len(vocab.label_keywords)} labels, {len(vocab.keywords)} keywords -> {out}")
    return 0
