"""The function-token decoder's weight table: the official state dict
(`esm3_function_decoder_v0.pth`) <-> esm3-jax variables, and `convert --kind function-decoder`.

A function-decoder checkpoint (params_io kind "function-decoder") stores {"params"} plus two text
files naming its outputs, since the logits mean nothing without them:
    DIR/keyword_vocabulary.txt  one keyword per line, row i of the keyword heads
    DIR/interpro_entries.txt    one InterPro accession per line, row i of the InterPro head
They are read on import from --keyword-vocabulary / --interpro-entries, by default the lists the
installed `esm` package ships (the released decoder's own), and checked against the head sizes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from esm3_jax.compat.layouts import (LINEAR, SAME, Array, Row, kernel, kernel_in, reshaped, state_to_variables,
                                     variables_to_state)
from esm3_jax.config import from_dict, to_dict
from esm3_jax.model.function_decoder import HEADS, FunctionDecoderConfig

KEYWORDS_FILE = "keyword_vocabulary.txt"
INTERPRO_FILE = "interpro_entries.txt"
RELEASED_N_HEADS = 8  # esm3_function_decoder_v0 (the reference's FunctionTokenDecoderConfig default)


def function_decoder_rows(cfg: FunctionDecoderConfig) -> list[Row]:
    d, H = cfg.d_model, cfg.n_heads
    K, hid = d // H, 4 * d
    p = ("params",)
    rows: list[Row] = [
        ("embedding.weight", p + ("embed",), SAME),
        ("decoder.norm.weight", p + ("final_norm", "scale"), SAME),
    ]
    for i in range(cfg.n_layers):
        t, a, f = f"decoder.blocks.{i}", p + (f"block_{i}_attn",), p + (f"block_{i}_ffn",)
        rows += [
            (f"{t}.attn.layernorm_qkv.0.weight", a + ("norm", "scale"), SAME),
            (f"{t}.attn.layernorm_qkv.0.bias", a + ("norm", "bias"), SAME),
            (f"{t}.attn.layernorm_qkv.1.weight", a + ("qkv",), kernel(d, (3, H, K))),
            (f"{t}.attn.layernorm_qkv.1.bias", a + ("qkv_bias",), reshaped((3, H, K))),
            (f"{t}.attn.out_proj.weight", a + ("out",), kernel_in((H, K), d)),
            (f"{t}.attn.out_proj.bias", a + ("out_bias",), SAME),
            (f"{t}.ffn.0.weight", f + ("norm", "scale"), SAME),
            (f"{t}.ffn.0.bias", f + ("norm", "bias"), SAME),
            (f"{t}.ffn.1.weight", f + ("up",), kernel(d, (hid,))),
            (f"{t}.ffn.1.bias", f + ("up_bias",), SAME),
            (f"{t}.ffn.3.weight", f + ("down",), LINEAR),
            (f"{t}.ffn.3.bias", f + ("down_bias",), SAME),
        ]
    for name in HEADS:
        t, h = f"heads.{name}", p + (name,)
        rows += [
            (f"{t}.0.weight", h + ("dense",), LINEAR),
            (f"{t}.0.bias", h + ("dense_bias",), SAME),
            (f"{t}.2.weight", h + ("norm", "scale"), SAME),
            (f"{t}.2.bias", h + ("norm", "bias"), SAME),
            (f"{t}.3.weight", h + ("out",), LINEAR),
            (f"{t}.3.bias", h + ("out_bias",), SAME),
        ]
    return rows


def infer_function_decoder_config(state: dict[str, Array], n_heads: int) -> FunctionDecoderConfig:
    """Sizes from the tensors; the head count is not visible in any shape."""
    if "embedding.weight" not in state or "heads.interpro_logits.3.weight" not in state:
        raise ValueError("not a function-decoder state dict: no 'embedding.weight' / 'heads.interpro_logits.3.weight'")
    n_inputs, d = state["embedding.weight"].shape
    base = FunctionDecoderConfig()
    unpack = n_inputs == 2 * base.function_token_depth * base.bits_per_token
    if not unpack and n_inputs != base.function_token_depth * base.function_token_vocab_size:
        raise ValueError(f"embedding has {n_inputs} rows: neither unpacked LSH bits (128) nor 8 x 260 token ids (2080)")
    cfg = FunctionDecoderConfig(
        d_model=int(d), n_heads=n_heads,
        n_layers=len({int(m.group(1)) for k in state if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))}),
        num_interpro_classes=int(state["heads.interpro_logits.3.weight"].shape[0]),
        keyword_vocabulary_size=int(state["heads.keyword_logits.3.weight"].shape[0]),
        unpack_lsh_bits=unpack,
    )
    cfg.validate()
    return cfg


def function_decoder_from_torch(state: dict[str, Array], n_heads: int = RELEASED_N_HEADS) -> tuple[FunctionDecoderConfig, dict]:
    cfg = infer_function_decoder_config(state, n_heads)
    return cfg, state_to_variables(state, function_decoder_rows(cfg), [], f"a function decoder of {cfg}")


def function_decoder_to_torch(variables: dict, cfg: FunctionDecoderConfig) -> dict[str, Array]:
    return variables_to_state(variables, function_decoder_rows(cfg), [])


# --- the label lists ------------------------------------------------------------------------------


def read_keyword_vocabulary(path: str | Path) -> list[str]:
    """One keyword per line (the reference's keyword_vocabulary_*.txt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such keyword vocabulary file")
    return path.read_text().strip().split("\n")


def read_interpro_entries(path: str | Path) -> list[str]:
    """Sorted InterPro accessions, as the reference indexes its head: from a tab-separated file
    with an ENTRY_AC column (InterPro's entry.list, the reference's entry_list_*.list) or one
    accession per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such InterPro entry list")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and "\t" in lines[0]:
        header = lines[0].split("\t")
        if "ENTRY_AC" not in header:
            raise ValueError(f"{path}: a tab-separated entry list needs an ENTRY_AC column, got {header}")
        col = header.index("ENTRY_AC")
        ids = [line.split("\t")[col] for line in lines[1:]]
    else:
        ids = [line.strip() for line in lines]
    return sorted(ids)


def _labels(args: argparse.Namespace, cfg: FunctionDecoderConfig, defaults: tuple[Path | None, Path | None]) -> dict[str, str]:
    default_kw, default_ipr = defaults
    kw_path = getattr(args, "keyword_vocabulary", None) or default_kw
    ipr_path = getattr(args, "interpro_entries", None) or default_ipr
    if kw_path is None or ipr_path is None:
        raise ValueError("give --keyword-vocabulary and --interpro-entries (the esm package, which ships the "
                         "released decoder's lists, is not installed)")
    keywords, interpro = read_keyword_vocabulary(kw_path), read_interpro_entries(ipr_path)
    for what, items, n, flag in (("keywords", keywords, cfg.keyword_vocabulary_size, "--keyword-vocabulary"),
                                 ("InterPro entries", interpro, cfg.num_interpro_classes, "--interpro-entries")):
        if len(items) != n:
            raise ValueError(f"the decoder has {n} {what} but {kw_path if what == 'keywords' else ipr_path} lists "
                             f"{len(items)}; give the decoder's own list with {flag}")
    return {KEYWORDS_FILE: "\n".join(keywords) + "\n", INTERPRO_FILE: "\n".join(interpro) + "\n"}


# `esm3-jax convert --kind function-decoder` (registered in convert.KINDS, which finds the
# default label files: this module is also read by inference/, where the esm package may not be).
def function_decoder_import(state: dict[str, Array], args: argparse.Namespace,
                            default_label_files: tuple[Path | None, Path | None] = (None, None)
                            ) -> tuple[dict, dict, dict[str, str]]:
    cfg, variables = function_decoder_from_torch(state, getattr(args, "n_heads", None) or RELEASED_N_HEADS)
    return variables, to_dict(cfg), _labels(args, cfg, default_label_files)


def function_decoder_export(variables: dict, config: dict) -> dict[str, Array]:
    return function_decoder_to_torch(variables, from_dict(FunctionDecoderConfig, config, "function decoder"))
