"""Where the tests find the repository's configs and demo data, and the shared real protein data
that sits beside the checkout (../shared/data, see its README)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO = REPO / "demo_data"
DATA = REPO / ".." / "shared" / "data"
STRUCTURES = DATA / "structures"
