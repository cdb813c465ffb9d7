"""The reference PyTorch implementation (`esm` on PyPI), built with random weights for comparison.

Its pretrained loaders reach for a model hub; these build its classes directly instead. Only the
parity tests and `esm3-jax bench` use this module; it needs the `test` extra (torch + esm).
"""

from __future__ import annotations

import types

import numpy as np

from esm3_jax import tokens as T

OUTPUT_NAMES = (
    "sequence_logits",
    "structure_logits",
    "secondary_structure_logits",
    "sasa_logits",
    "function_logits",
    "residue_logits",
    "embeddings",
)


def build_reference_esm3(d_model: int, n_heads: int, v_heads: int, n_layers: int, seed: int = 0):
    """A reference ESM3 in fp32 eval mode with random weights, and its state dict as numpy.

    The geometric-attention scales (zero at init) and the LayerNorm affines (1/0 at init) are
    randomised, so that a wrong mapping of any of them changes the outputs.
    """
    import torch
    from esm.models.esm3 import ESM3

    torch.manual_seed(seed)
    tokenizers = types.SimpleNamespace(sequence=types.SimpleNamespace(mask_token_id=T.SEQUENCE_MASK))
    model = ESM3(d_model, n_heads, v_heads, n_layers, None, None, None, tokenizers).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_scale_per_head"):
                p.normal_()
            elif p.ndim == 1 and ("ln" in name or "norm" in name or ".0." in name or ".2." in name):
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, state


def to_torch_inputs(inputs: dict) -> dict:
    import torch

    out = {}
    for k, v in inputs.items():
        if v is None:
            continue
        a = np.asarray(v)
        out[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a)
    return out


def reference_forward(model, inputs: dict) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(**to_torch_inputs(inputs))
    return {n: getattr(out, n).float().numpy() for n in OUTPUT_NAMES}


def attach_generation_tokenizers(model) -> None:
    """Give a reference ESM3 built by `build_reference_esm3` the tokenizers its `generate` and
    `batch_generate` read. The function and residue tokenizers read data files from the model hub;
    generating the other tracks only asks them for their mask/pad/bos/eos ids (all 0) and the
    function depth, so those two are stand-ins with exactly that."""
    from esm.tokenization import EsmSequenceTokenizer, SASADiscretizingTokenizer, SecondaryStructureTokenizer, StructureTokenizer

    stub = types.SimpleNamespace(depth=T.FUNCTION_DEPTH, mask_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                 vocab_to_index={"<none>": T.FUNCTION_NONE})
    model.tokenizers = types.SimpleNamespace(
        sequence=EsmSequenceTokenizer(), structure=StructureTokenizer(),
        secondary_structure=SecondaryStructureTokenizer(kind="ss8"), sasa=SASADiscretizingTokenizer(),
        function=stub, residue_annotations=stub,
    )
