"""Data pipeline (datatrove): raw corpora -> cleaned, deduplicated, tokenised Megatron mix."""
