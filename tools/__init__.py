"""Command-line tools: checkpoint converters, checks and benchmarks."""
