"""What simple count models reach on the demo's held-out sequences: the ceiling a small model can
approach in minutes, beside the unigram that `esm3-jax evaluate` prints.

    python3 launch/demo_count_baselines.py runs/demo/split

Tables are counted on the split's train sequences and scored on its test sequences (nats per
residue). With 30 % of a 126-residue crop masked, like the training noise: the unigram, the
protein's own visible composition (Dirichlet-smoothed toward the unigram) and the left neighbour
(a bigram). Given the SS8 labels: a per-residue table p(aa | ss8) and one over a window of SS8
labels. Only numpy and the standard library.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
SS8 = "HGIEBTSL"  # anything else (e.g. '-') counts as L (coil)


def load(split_dir: Path) -> list[np.ndarray]:
    """(L, 2) arrays of (amino acid, SS8) indices, one per chain, standard residues only."""
    aa, ss = {a: i for i, a in enumerate(AMINO_ACIDS)}, {c: i for i, c in enumerate(SS8)}
    chains = []
    for path in sorted(split_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            pairs = [(aa[a], ss.get(s, 7)) for a, s in zip(row["seq"], row["dssp8"]) if a in aa]
            if pairs:
                chains.append(np.array(pairs, dtype=np.int64))
    if not chains:
        raise SystemExit(f"{split_dir}: no *.jsonl chains with seq and dssp8 (a `esm3-jax split` output folder)")
    return chains


def masked_context_baselines(train, test, rng) -> dict[str, float]:
    unigram = np.bincount(np.concatenate(train)[:, 0], minlength=20) + 1.0
    unigram /= unigram.sum()
    bigram = np.ones((20, 20))
    for c in train:
        np.add.at(bigram, (c[:-1, 0], c[1:, 0]), 1)
    bigram /= bigram.sum(1, keepdims=True)
    nll = defaultdict(list)
    for c in test:
        s = c[:126, 0]
        masked = rng.random(len(s)) < 0.3
        if not masked.any() or masked.all():
            continue
        target = s[masked]
        nll["unigram (train frequencies)"] += list(-np.log(unigram[target]))
        visible = np.bincount(s[~masked], minlength=20)
        for alpha in (20, 100):
            p = (visible + alpha * unigram) / (visible.sum() + alpha)
            nll[f"own visible composition, smoothing {alpha}"] += list(-np.log(p[target]))
        for i in np.flatnonzero(masked):
            p = bigram[s[i - 1]] if i > 0 and not masked[i - 1] else unigram
            nll["left neighbour when visible (bigram)"].append(-np.log(p[s[i]]))
    return {k: float(np.mean(v)) for k, v in nll.items()}


def ss8_baselines(train, test) -> dict[str, float]:
    unigram = np.bincount(np.concatenate(train)[:, 0], minlength=20) + 1.0
    unigram /= unigram.sum()
    out = {}
    for w in (0, 1):
        def windows(c):
            L = len(c)
            return [tuple(c[j, 1] if 0 <= j < L else 8 for j in range(i - w, i + w + 1)) for i in range(L)]

        counts = defaultdict(lambda: np.zeros(20))
        for c in train:
            for key, a in zip(windows(c), c[:, 0]):
                counts[key][a] += 1
        nll = []
        for c in test:
            for key, a in zip(windows(c), c[:, 0]):
                p = counts[key] + 5 * unigram  # unseen windows fall back to the unigram
                nll.append(-np.log(p[a] / p.sum()))
        out[f"sequence given SS8 (window of {2 * w + 1})"] = float(np.mean(nll))
    return out


def main() -> None:
    split = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/split")
    train, test = load(split / "train"), load(split / "test")
    test_all = np.concatenate(test)[:, 0]
    freq = np.bincount(test_all, minlength=20) / len(test_all)
    print(f"{split}: {len(train)} train chains, {len(test)} test chains; nats per residue")
    print(f"  {'test split entropy (its own frequencies)':<48} {-(freq[freq > 0] * np.log(freq[freq > 0])).sum():.3f}")
    for k, v in masked_context_baselines(train, test, np.random.default_rng(0)).items():
        print(f"  {k:<48} {v:.3f}   (30 % masked)")
    for k, v in ss8_baselines(train, test).items():
        print(f"  {k:<48} {v:.3f}   (all masked)")


if __name__ == "__main__":
    main()
