"""Harness for tpfx's tests and benchmarks, not part of the sharding API: every causal-LM family of the installed
transformers built tiny from its default config (``families``), and the check that shards each on gloo ranks
against the unsharded model (``coverage``), used by tests/test_families.py, benchmarks/coverage.py and
benchmarks/blocks_check.py."""
