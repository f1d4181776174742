"""Benchmarks: `throughput` measures smollm_ref's fast paths beside transformers (`python bench/throughput.py`)."""
