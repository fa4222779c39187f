"""What a build is given, checked before any work starts; and the one error type a build stops with."""


class BuildError(SystemExit):
    """A build that cannot go on; the message says why and what to do."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def check_raw_shards(raw_dir, raw_tars):
    if not raw_tars:
        raise BuildError(f"no .tar shards in '{raw_dir}'; run `make download` first "
                         "(or point RAW at img2dataset's webdataset output)")
    for raw_tar in raw_tars:
        expected = (raw_tar.with_name(f"{raw_tar.stem}_stats.json"), raw_tar.with_suffix(".parquet"))
        missing = [path.name for path in expected if not path.exists()]
        if missing:
            raise BuildError(f"raw shard '{raw_tar}' has no {' or '.join(missing)}: img2dataset did not finish it (a "
                             f"download stopped while writing it). Delete {raw_tar.name} and run `make download` "
                             "again: its incremental mode fetches just that shard.")
