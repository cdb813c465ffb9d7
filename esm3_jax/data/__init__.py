"""Input files -> records -> shards -> batches: readers, tokenization, preprocessing, the Grain pipeline."""
