"""Using a trained model: the batched forward pass and the structure tokenizer (generation comes here)."""
