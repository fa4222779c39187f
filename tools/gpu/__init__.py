"""Validating on a bare, offline GPU machine: `make gpu-kit` here, then receive and `make gpu-check` there."""
