"""Where the tests find the repository's configs and demo data, and the shared real protein data
that sits beside the checkout (../shared/data, see its README)."""

import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO = REPO / "demo_data"
DATA = REPO / ".." / "shared" / "data"
STRUCTURES = DATA / "structures"
# XLA's persistent compilation cache the training tests share (keyed by program and jax version).
JAX_CACHE = Path(tempfile.gettempdir()) / "esm3-jax-test-compilation-cache"
