"""Benchmarks: each writes runs/bench/<name>.json and a PNG chart."""
