"""Command-line programs around the core: demo data, benchmarks, evaluation, export."""
