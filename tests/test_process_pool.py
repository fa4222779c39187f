"""Errors raised in process-pool workers reach the caller with their real message."""

import pytest

from datapipe.common.process_pool import ProcessPool, WorkerError


class HoldsAFile(Exception):
    """Like webdataset's tar errors: an open file in its args, so it cannot be pickled."""


def fail_holding_a_file(path):
    with open(path, "rb") as stream:
        raise HoldsAFile(f"{path} is not a tar", stream)


def fail_plainly(value):
    raise ValueError(f"bad value {value}")


def test_a_worker_error_that_cannot_be_pickled_arrives_as_its_message_and_others_as_they_are(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    with ProcessPool(1) as pool:
        with pytest.raises(WorkerError, match=r"^HoldsAFile: \('.*bad.tar is not a tar', <_io.BufferedReader"):
            pool.submit(fail_holding_a_file, tmp_path / "bad.tar").result()
        with pytest.raises(ValueError, match="^bad value 3$"):
            list(pool.map(fail_plainly, [3]))
