"""Instruments around the product: benchmarks, the GPU kit and check, a loopback S3 server, the crop grid, and
the Makefile's argument splitter."""
