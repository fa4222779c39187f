"""Byte counts as people read them: in the largest of GiB, MiB and KiB that keeps the figure at 1 or more."""

UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def readable_bytes(count):
    """e.g. '2.5 GiB', '12.0 MiB', '3.4 KiB', '512 bytes'."""
    for unit, size in UNITS:
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"
