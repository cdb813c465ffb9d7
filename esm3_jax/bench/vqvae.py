"""`esm3-jax bench vqvae`: structure-token encoding and decoding speed, side by side with the
reference PyTorch implementation on identical weights and inputs.

Both run on the same machine in one process: the reference through `esm.models.vqvae` with
random weights of the requested size (its pretrained loader needs a model hub), this port through
the converted weights. Tokens are checked to agree before any number is printed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from esm3_jax import tokens as T
from esm3_jax.runtime.hardware import time_fn
from esm3_jax.train.vqvae.data import SHARED_STRUCTURES_DIR
from esm3_jax.model.vqvae import RELEASED_DECODER, RELEASED_ENCODER, DecoderConfig, EncoderConfig, StructureDecoder, StructureEncoder
from esm3_jax.compat.tokenizer_weights import decoder_from_torch, encoder_from_torch



def real_backbones(n_chains: int, length: int, data_dir: Path = SHARED_STRUCTURES_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(B, L, 3, 3) backbones and (B, L) residue numbers: the first chains of index.jsonl that are
    at least `length` long, cut to `length`."""
    from esm3_jax.structure.io import load_chain

    index = data_dir / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: benchmark inputs are real chains from the shared data folder")
    coords, res = [], []
    for line in index.read_text().splitlines():
        row = json.loads(line)
        if row["n_res"] < length:
            continue
        chain = load_chain(data_dir / row["file"], row["chain"])
        coords.append(chain.backbone[:length])
        res.append(chain.residue_index[:length])
        if len(coords) == n_chains:
            return np.stack(coords).astype(np.float32), np.stack(res).astype(np.int32)
    raise ValueError(f"{index}: fewer than {n_chains} chains of length >= {length}")


def bench_vqvae(
    n_chains: int = 8,
    length: int = 256,
    encoder: EncoderConfig = RELEASED_ENCODER,
    decoder: DecoderConfig | None = RELEASED_DECODER,
    repeats: int = 2,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Residues per second for encoding (and decoding, unless decoder is None), ours and the
    reference's, with the ratios. Returns the numbers as a dict."""
    import torch
    from esm.models.vqvae import StructureTokenDecoder, StructureTokenEncoder

    torch.manual_seed(seed)
    coords, res = real_backbones(n_chains, length)
    n_res = coords.shape[0] * coords.shape[1]
    results: dict[str, float] = {"chains": n_chains, "length": length, "jax_backend": jax.default_backend()}

    ref_enc = StructureTokenEncoder(
        d_model=encoder.d_model, n_heads=1, v_heads=encoder.v_heads, n_layers=encoder.n_layers,
        d_out=encoder.d_out, n_codes=encoder.n_codes,
    ).eval()
    state = {k: v.detach().numpy() for k, v in ref_enc.state_dict().items()}
    cfg, variables = encoder_from_torch(state)
    variables = jax.device_put(variables)
    enc_fn = jax.jit(lambda v, c, r: StructureEncoder(cfg).apply(v, c, r, method=StructureEncoder.encode)["tokens"])
    c_t, r_t = torch.from_numpy(coords), torch.from_numpy(res.astype(np.int64))

    def ref_encode():
        with torch.no_grad():
            return ref_enc.encode(c_t, residue_index=r_t)[1]

    ours = np.asarray(enc_fn(variables, coords, res))
    agree = float(np.mean(ours == ref_encode().numpy()))
    if agree < 0.99:
        raise RuntimeError(f"tokens disagree with the reference on {100 * (1 - agree):.1f}% of residues")
    t_ref = time_fn(ref_encode, repeats)
    t_jax = time_fn(lambda: jax.block_until_ready(enc_fn(variables, coords, res)), repeats)
    results.update(encode_ref_res_per_s=n_res / t_ref, encode_jax_res_per_s=n_res / t_jax,
                   encode_speedup=t_ref / t_jax, token_agreement=agree)
    print_fn(f"encode  {n_chains} x {length}, d_model {encoder.d_model}: reference {n_res / t_ref:8.1f} res/s, "
             f"esm3-jax {n_res / t_jax:8.1f} res/s, ratio {t_ref / t_jax:.2f}x (tokens agree {100 * agree:.1f}%)")

    if decoder is not None:
        ref_dec = StructureTokenDecoder(d_model=decoder.d_model, n_heads=decoder.n_heads, n_layers=decoder.n_layers).eval()
        dstate = {k: v.detach().numpy() for k, v in ref_dec.state_dict().items()}
        dcfg, dvars = decoder_from_torch(dstate, decoder.n_heads)
        dvars = jax.device_put(dvars)
        tokens = np.concatenate(
            [np.full((n_chains, 1), T.STRUCTURE_BOS), ours, np.full((n_chains, 1), T.STRUCTURE_EOS)], axis=1
        ).astype(np.int32)
        dec_fn = jax.jit(lambda v, t: StructureDecoder(dcfg).apply(v, t)["backbone"])
        tok_t = torch.from_numpy(tokens.astype(np.int64))

        def ref_decode():
            with torch.no_grad():
                return ref_dec.decode(tok_t)["bb_pred"]

        err = float(np.max(np.abs(np.asarray(dec_fn(dvars, tokens)) - ref_decode().numpy())))
        t_ref = time_fn(ref_decode, repeats)
        t_jax = time_fn(lambda: jax.block_until_ready(dec_fn(dvars, tokens)), repeats)
        results.update(decode_ref_res_per_s=n_res / t_ref, decode_jax_res_per_s=n_res / t_jax,
                       decode_speedup=t_ref / t_jax, decode_max_abs_diff_angstrom=err)
        print_fn(f"decode  {n_chains} x {length}, {decoder.n_layers} x {decoder.d_model}: reference "
                 f"{n_res / t_ref:8.1f} res/s, esm3-jax {n_res / t_jax:8.1f} res/s, ratio {t_ref / t_jax:.2f}x "
                 f"(backbones differ by at most {err:.1e} Å)")
    return results


if __name__ == "__main__":  # python -m esm3_jax.bench.vqvae [chains length [decoder_layers]]
    import sys

    a = sys.argv[1:]
    dec = dataclasses.replace(RELEASED_DECODER, n_layers=int(a[2])) if len(a) > 2 else RELEASED_DECODER
    bench_vqvae(int(a[0]) if a else 8, int(a[1]) if len(a) > 1 else 256, decoder=dec)
