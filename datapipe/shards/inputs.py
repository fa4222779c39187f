"""What a build is given, checked before any work starts; and the one error type a build stops with.

Checked here, before the output folder is locked: the raw shards (each with its img2dataset stats and parquet,
both readable), the output folder, the settings, and the EXCLUDE list's syntax. The EXCLUDE images themselves
are read and hashed before pass 1 (datapipe/shards/exclusions.py), so no input problem waits for a validation pass.

EXCLUDE separates paths with ':'. A ':' that is part of a path is written '\\:' (`EXCLUDE='/data/eval\\:2024'`).
"""

import itertools
import json
import re
from pathlib import Path

import pyarrow.parquet as pq

ESCAPED_COLON = "\\:"  # a ':' inside an EXCLUDE path
EXCLUDE_SEPARATOR = re.compile(r"(?<!\\):")  # a ':' not preceded by a backslash


class BuildError(SystemExit):
    """A build that cannot go on; the message says why and what to do."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def check_raw_shards(raw_dir, raw_tars):
    """Every raw shard comes with img2dataset's stats (JSON) and parquet, both readable."""
    if not raw_tars:
        raise BuildError(f"no .tar shards in '{raw_dir}'; run `make download` first "
                         "(or point RAW at img2dataset's webdataset output)")
    for raw_tar in raw_tars:
        companions = _companion_files(raw_tar)
        missing = [path.name for path, _ in companions if not path.exists()]
        if missing:
            raise BuildError(f"raw shard '{raw_tar}' has no {' or '.join(missing)}: img2dataset did not finish it (a "
                             f"download stopped while writing it). Delete {raw_tar.name} and run `make download` "
                             "again: its incremental mode fetches just that shard.")
        for path, read in companions:
            try:
                read(path)
            except Exception as error:  # noqa: BLE001 (json and pyarrow raise several types for a damaged file)
                raise BuildError(f"'{path}' cannot be read ({type(error).__name__}: {error}): img2dataset did not "
                                 f"finish it. Delete {raw_tar.name} and {path.name}, then run `make download` "
                                 "again: its incremental mode fetches just that shard.") from None


def _companion_files(raw_tar):
    """(path, reader) of the files img2dataset writes next to a raw shard; each reader raises if it is damaged."""
    return ((raw_tar.with_name(f"{raw_tar.stem}_stats.json"), _read_stats), (raw_tar.with_suffix(".parquet"),
                                                                             pq.read_metadata))


def _read_stats(path):
    stats = json.loads(path.read_text())
    if not isinstance(stats, dict):
        raise ValueError(f"a JSON object was expected, not {type(stats).__name__}")
    return stats


def check_settings(out_dir, samples_per_shard, processes):
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"OUT '{out_dir}' is a file, not a folder: give a folder for the training shards")
    for name, value in (("--samples-per-shard (SAMPLES_PER_SHARD)", samples_per_shard),
                        ("--processes (PROCESSES)", processes)):
        if not isinstance(value, int) or value < 1:
            raise BuildError(f"{name} must be a whole number of at least 1 (got {value!r})")


def exclude_paths(value):
    """The paths of an EXCLUDE value: separated by ':', with '\\:' for a ':' inside a path. A path that does not
    exist but would with the ':' after it is refused, naming the escape that gives it."""
    paths = [piece.replace(ESCAPED_COLON, ":") for piece in EXCLUDE_SEPARATOR.split(value)]
    for path, following in itertools.pairwise(paths):
        joined = f"{path}:{following}"
        if path and not Path(path).exists() and Path(joined).exists():
            raise BuildError(f"EXCLUDE path '{path}' does not exist, but '{joined}' does: EXCLUDE separates paths "
                             f"with ':', so write a ':' inside a path as '{ESCAPED_COLON}' "
                             f"(EXCLUDE='{joined.replace(':', ESCAPED_COLON)}')")
    return tuple(path for path in paths if path)
