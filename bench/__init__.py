"""Benchmarks (`make bench`): throughput and memory targets live here, never in timed tests."""
