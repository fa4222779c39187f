"""The process pool of every parallel job in datapipe and tools: errors raised in a worker reach the caller.

concurrent.futures sends a worker's exception back by pickling it. One that cannot make the trip (it holds an
open file, as webdataset's tar errors do, or its constructor takes other arguments than it stores) arrives as
`TypeError: cannot pickle ...` or breaks the pool, and the real message is lost. Every task of a ProcessPool
therefore runs inside `Reported`: an exception that survives a pickle round trip is raised as it is; any other
comes back as a WorkerError holding its type and message, with the worker's traceback as its cause.

Workers are spawned, not forked: a caller that already imported torch (its thread pools) would deadlock forked
workers.
"""

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor


class WorkerError(Exception):
    """An exception raised in a worker that could not be sent back as it was: `TypeName: message`."""


def crosses_processes(error):
    """Whether `error` comes out of a pickle round trip as the same type with the same message."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 (pickling fails with many types: TypeError, PicklingError, AttributeError)
        return False
    return type(copy) is type(error) and str(copy) == str(error)


class Reported:
    """`function` as a pool task whose exceptions always reach the caller with their message."""

    def __init__(self, function):
        self.function = function

    def __call__(self, *args, **kwargs):
        try:
            return self.function(*args, **kwargs)
        except Exception as error:
            if crosses_processes(error):
                raise
            raise WorkerError(f"{type(error).__name__}: {error}") from error


class ProcessPool(ProcessPoolExecutor):
    """A spawn-context ProcessPoolExecutor whose tasks (submit and map) run inside Reported."""

    def __init__(self, processes):
        super().__init__(processes, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, function, /, *args, **kwargs):
        return super().submit(Reported(function), *args, **kwargs)
