"""Spark for `make shards DISTRIBUTOR=pyspark`: what it needs installed (checked before the build starts), the
session (on the master the user names), and Python functions run as Spark tasks with their errors intact.

The master: `--spark-master` (make shards SPARK_MASTER=...), else the `spark.master` that spark-submit or
spark-defaults.conf set, else local[*] (every core of this machine). A session already running in this process
(a notebook, a test) is used as it is and left running.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from datapipe.common.process_pool import WorkerError, crosses_processes
from datapipe.shards.inputs import BuildError

JAVA_MAJOR_VERSION = 17  # the oldest Java that Spark 4 runs on
INSTALL_PYSPARK = "install it with `.venv/bin/pip install -e '.[spark]'` (or `pip install pyspark`)"
INSTALL_JAVA = "install Java 17 or later (e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME to one"


def _java():
    """The java executable Spark would start: JAVA_HOME's, else the one on PATH; None when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        return str(candidate) if candidate.is_file() else None
    return shutil.which("java")


def _java_major_version(java):
    """The major version `java -version` reports (8 for 1.8), or None when it does not say."""
    try:
        reported = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    except OSError:
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', reported)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def check_requirements():
    """Raise BuildError (one line naming the install) unless pyspark can be imported and Java 17+ started."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise BuildError(f"--distributor pyspark (DISTRIBUTOR=pyspark) needs pyspark, which is not installed: "
                         f"{INSTALL_PYSPARK}") from None
    java = _java()
    if java is None:
        where = f"JAVA_HOME={os.environ['JAVA_HOME']}" if os.environ.get("JAVA_HOME") else "PATH"
        raise BuildError(f"--distributor pyspark (DISTRIBUTOR=pyspark) needs Java, and there is no java on {where}: "
                         f"{INSTALL_JAVA}")
    version = _java_major_version(java)
    if version is None or version < JAVA_MAJOR_VERSION:
        raise BuildError(f"--distributor pyspark (DISTRIBUTOR=pyspark) needs Java {JAVA_MAJOR_VERSION} or later; "
                         f"{java} is {'version ' + str(version) if version else 'not a Java it can read'}: "
                         f"{INSTALL_JAVA}")


@contextlib.contextmanager
def spark_session(master=None):
    """The SparkSession of the build: the one running in this process, or a new one on `master` (stopped after)."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    running = SparkSession.getActiveSession()
    if running is not None:
        _check_no_speculation(running)
        yield running
        return
    # Spark's Python workers must import this project: this interpreter on this machine (a cluster's executors set
    # PYSPARK_PYTHON to theirs: docs/spark.md).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    try:
        SparkContext._ensure_initialized()  # the JVM, holding spark-submit's and spark-defaults.conf's settings
        master = master or SparkConf().get("spark.master", "local[*]")
        session = SparkSession.builder.appName("make shards").master(master).getOrCreate()
    except Exception as error:  # noqa: BLE001 (py4j and pyspark raise several types for a master that does not answer)
        raise BuildError(f"Spark did not start on master {master or 'local[*]'!r} ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else error}); check "
                         "--spark-master (SPARK_MASTER) and docs/spark.md") from None
    try:
        _check_no_speculation(session)
        yield session
    finally:
        session.stop()


def _check_no_speculation(session):
    """Speculative execution runs a second copy of a slow task: two copies would write the same shard files."""
    if session.conf.get("spark.speculation", "false").lower() == "true":
        raise BuildError("spark.speculation is on: two copies of a task would write the same shard files. Build "
                         "with it off (Spark's default): --conf spark.speculation=false")


def _outcome(function, arguments):
    """(True, function(*arguments)) or (False, the exception it raised, as ProcessPool would send it back)."""
    try:
        return True, function(*arguments)
    except Exception as error:  # noqa: BLE001 (sent to the driver, which raises it)
        return False, error if crosses_processes(error) else WorkerError(f"{type(error).__name__}: {error}")


def run_tasks(session, function, arguments):
    """[function(*args) for args in arguments], one Spark task each, in order; an exception a task raised is
    raised here as it was (as a ProcessPool raises it: datapipe/common/process_pool.py)."""
    arguments = list(arguments)
    if not arguments:
        return []
    outcomes = session.sparkContext.parallelize(arguments, len(arguments)).map(
        lambda args: _outcome(function, args)).collect()
    for succeeded, value in outcomes:
        if not succeeded:
            raise value
    return [value for _, value in outcomes]


class SparkMap:
    """The `map` of a concurrent.futures executor, run as Spark tasks (for exclusions.load)."""

    def __init__(self, session):
        self.session = session

    def map(self, function, *iterables):
        return run_tasks(self.session, function, zip(*iterables, strict=True))
