"""Measuring a trained tokenizer: reconstruction metrics, a linear probe of the tokens, reconstruction grids."""
