"""Every ESM3 vocabulary and special id (ESM3_SPEC section 1), with encode/decode. Pure numpy.

The ids must equal the reference release's so that converted weights read the same tokens.
"""

from __future__ import annotations

# --- sequence track -------------------------------------------------------------------------
SEQUENCE_VOCAB = (
    ["<cls>", "<pad>", "<eos>", "<unk>"]
    + list("LAGVSERTIDPKQNFYMHWC")
    + ["X", "B", "U", "Z", "O", ".", "-", "|", "<mask>"]
)
SEQUENCE_BOS = 0
SEQUENCE_PAD = 1
SEQUENCE_EOS = 2
SEQUENCE_UNK = 3
SEQUENCE_CHAINBREAK = 31
SEQUENCE_MASK = 32
SEQUENCE_EMBED_ROWS = 64  # the table (and head) is padded to 64 rows; only 33 are real tokens

# --- structure tokens (VQ-VAE codes) ---------------------------------------------------------
STRUCTURE_CODEBOOK_SIZE = 4096
STRUCTURE_MASK = 4096
STRUCTURE_EOS = 4097
STRUCTURE_BOS = 4098
STRUCTURE_PAD = 4099
STRUCTURE_CHAINBREAK = 4100
STRUCTURE_VOCAB_SIZE = 4101
STRUCTURE_UNDEFINED = 955

# --- SS8 ---------------------------------------------------------------------------------------
SS8_VOCAB = ["<pad>", "<motif>", "<unk>"] + list("GHITEBSC")
SS8_PAD = 0  # also mask, BOS and EOS in the released tokenizer
SS8_VOCAB_SIZE = 11

# --- SASA --------------------------------------------------------------------------------------
SASA_BIN_EDGES = (0.8, 4.0, 9.6, 16.4, 24.5, 32.9, 42.0, 51.5, 61.2, 70.9, 81.6, 93.3, 107.2, 125.4, 151.4)
SASA_PAD = 0  # also mask, BOS and EOS
SASA_VOCAB_SIZE = 19

# --- function tokens ---------------------------------------------------------------------------
FUNCTION_DEPTH = 8
FUNCTION_VOCAB_SIZE = 260
FUNCTION_PAD = 0  # also mask, BOS and EOS
FUNCTION_MOTIF = 1
FUNCTION_UNK = 2
FUNCTION_NONE = 3
FUNCTION_LSH_OFFSET = 4

# --- residue annotations -----------------------------------------------------------------------
RESIDUE_VOCAB_SIZE = 1478
RESIDUE_MAX_ANNOTATIONS = 16
RESIDUE_PAD = 0

# --- pLDDT --------------------------------------------------------------------------------------
PLDDT_RBF_BINS = 16
