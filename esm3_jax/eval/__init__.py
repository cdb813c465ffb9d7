"""Turning runs and checkpoints into numbers and figures: loss curves today; held-out NLL,
conditioning and the scaling ladder come here."""
