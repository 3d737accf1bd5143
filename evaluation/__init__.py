"""Evaluation: domain perplexity, lm-evaluation-harness, LLM judge."""
