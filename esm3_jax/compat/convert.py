"""`esm3-jax convert`: official PyTorch state dicts <-> esm3-jax checkpoints, for every model kind.

Each kind registers an (import, export) pair built on its weight table (esm3_weights.py,
tokenizer_weights.py); model sizes are inferred from tensor shapes, only the head count needs a flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np

from esm3_jax.compat import function_decoder_weights, tokenizer_weights
from esm3_jax.compat.esm3_weights import esm3_params_to_torch, infer_esm3_config, torch_to_esm3_params
from esm3_jax.compat.layouts import Array
from esm3_jax.compat.params_io import (DECODER_KIND, ENCODER_KIND, ESM3_KIND, FUNCTION_DECODER_KIND, load_params,
                                      save_params)
from esm3_jax.config import to_dict
from esm3_jax.model.config import model_config_from_dict


# --- files ------------------------------------------------------------------------------------


def read_torch_state_dict(path: str | Path) -> dict[str, Array]:
    try:
        import torch
    except ImportError as e:  # torch is only needed at the conversion boundary
        raise ValueError("reading a PyTorch state dict needs torch: pip install 'torch==2.13.0'") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({e})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def write_torch_state_dict(state: dict[str, Array], path: str | Path) -> None:
    try:
        import torch
    except ImportError as e:
        raise ValueError("writing a PyTorch state dict needs torch: pip install 'torch==2.13.0'") from e
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


# Converters for other model kinds register here: kind -> (import fn, export fn).
# import fn: (state dict, args) -> (params, config dict[, {file name: text} written next to them]);
# export fn: (params, config dict) -> state dict.
def _esm3_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict]:
    if args.n_heads is None:
        raise ValueError("--n-heads is required for --kind esm3 (24 for esm3-sm-open-v1)")
    cfg = infer_esm3_config(state, args.n_heads)
    return torch_to_esm3_params(state, cfg), to_dict(cfg)


def _esm3_export(params: dict, config: dict) -> dict[str, Array]:
    return esm3_params_to_torch(params, model_config_from_dict(config))


def _esm_function_label_files() -> tuple[Path | None, Path | None]:
    """The keyword and InterPro lists the installed esm package ships with the released function
    decoder (files in the package, no download); (None, None) without the package."""
    try:
        from esm.utils.constants import esm3 as C
    except ImportError:
        return None, None
    return Path(C.IN_REPO_DATA_FOLDER) / Path(C.KEYWORDS_VOCABULARY).name, Path(C.INTERPRO_ENTRY)


def _function_decoder_import(state: dict[str, Array], args: argparse.Namespace) -> tuple[dict, dict, dict[str, str]]:
    return function_decoder_weights.function_decoder_import(state, args, _esm_function_label_files())


KINDS: dict[str, tuple[Callable, Callable]] = {
    ESM3_KIND: (_esm3_import, _esm3_export),
    ENCODER_KIND: (tokenizer_weights.encoder_import, tokenizer_weights.encoder_export),
    DECODER_KIND: (tokenizer_weights.decoder_import, tokenizer_weights.decoder_export),
    FUNCTION_DECODER_KIND: (_function_decoder_import, function_decoder_weights.function_decoder_export),
}



def convert_torch_to_checkpoint(torch_path: str | Path, out_dir: str | Path, kind: str, args: argparse.Namespace) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown --kind '{kind}'; choose from {sorted(KINDS)}")
    state = read_torch_state_dict(torch_path)
    try:
        params, config, *extra = KINDS[kind][0](state, args)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{torch_path}: {e}") from e
    out = save_params(out_dir, params, config, kind)
    for name, text in (extra[0] if extra else {}).items():
        (out / name).write_text(text)
    return out


def export_checkpoint_to_torch(checkpoint: str | Path, out_path: str | Path) -> None:
    kind, config, params = load_params(checkpoint)
    if kind not in KINDS:
        raise ValueError(f"{checkpoint}: cannot export kind '{kind}'")
    write_torch_state_dict(KINDS[kind][1](params, config), out_path)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-state-dict", help="PyTorch .pth to import (official release format)")
    p.add_argument("--kind", default="esm3", help="model kind: " + ", ".join(sorted(KINDS)) + " (default esm3)")
    p.add_argument("--n-heads", type=int, help="attention heads (not inferable from shapes; 24 for esm3-sm-open-v1, "
                   "20 for the structure decoder; the function decoder defaults to its release's 8)")
    p.add_argument("--keyword-vocabulary", help="function-decoder import: its keyword list, one per line "
                   "(default: the list the installed esm package ships)")
    p.add_argument("--interpro-entries", help="function-decoder import: its InterPro entry list (ENTRY_AC column "
                   "or one accession per line; default: the list the installed esm package ships)")
    p.add_argument("--out", required=True, help="output checkpoint directory (import) or .pth path (--export)")
    p.add_argument("--export", metavar="CHECKPOINT_DIR", help="export this esm3-jax checkpoint to a PyTorch state dict")


def cli_main(args: argparse.Namespace) -> int:
    if args.export:
        export_checkpoint_to_torch(args.export, args.out)
        print(f"wrote PyTorch state dict {args.out}")
        return 0
    if not args.torch_state_dict:
        raise ValueError("give --torch-state-dict PATH to import, or --export CHECKPOINT_DIR to export")
    out = convert_torch_to_checkpoint(args.torch_state_dict, args.out, args.kind, args)
    print(f"wrote {args.kind} checkpoint {out}")
    return 0
