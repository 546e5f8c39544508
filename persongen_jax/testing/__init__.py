"""Tiny random reference models for tests, smoke runs and benchmarks (needs the [torch] extra)."""
