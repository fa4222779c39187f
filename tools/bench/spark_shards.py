"""`make shards DISTRIBUTOR=pyspark` in Spark's local mode: how it scales, and what it shuffles.

On the demo raw set (shards/demo/raw, downloaded by demo.download when missing) and a generated CC3M-like one
(tools/bench/scale.py's shards, `--rows` url-list rows), each build in a fresh output folder:
- the Spark build on local[1] and local[2]: its time per step (datapipe/shards/spark_pipeline.py's steps) and the
  bytes each step's Spark stages wrote to and read from the shuffle (Spark's REST API: stage metrics
  shuffleWriteBytes and shuffleReadBytes, grouped by the build's job groups); the session's start-up is timed apart,
  and one build before them, not recorded, takes the JVM's one-off warm-up;
- the local build on 1 and 2 processes, side by side, for the ratio.
Writes <out>/spark_shards.json and spark_shards.png; the report adds a BENCHMARKS.md section, and docs/spark.md
extrapolates to LAION-400M from these figures.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import matplotlib

from datapipe import shards
from datapipe.common.validate import ImageRules
from datapipe.shards.screen import DuplicateRules
from tools.bench.scale import generate

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SAMPLES_PER_SHARD = 1000
MASTERS = ("local[1]", "local[2]")


def _rest(session, path):
    context = session.sparkContext
    with urllib.request.urlopen(f"{context.uiWebUrl}/api/v1/applications/{context.applicationId}/{path}") as reply:
        return json.loads(reply.read())


def shuffle_bytes(session):
    """({step: bytes its stages wrote to the shuffle}, {step: bytes they read from it}) of the session's jobs."""
    time.sleep(2)  # the REST API's store is filled by Spark's listener bus, a moment after the jobs end
    stages = {stage["stageId"]: stage for stage in _rest(session, "stages") if stage["status"] == "COMPLETE"}
    written, read = Counter(), Counter()
    for job in _rest(session, "jobs"):
        for stage_id in job["stageIds"]:
            stage = stages.pop(stage_id, None)  # a stage shared by several jobs is counted once
            if stage:
                written[job.get("jobGroup", "")] += stage["shuffleWriteBytes"]
                read[job.get("jobGroup", "")] += stage["shuffleReadBytes"]
    return dict(written), dict(read)


def spark_build(raw_dir, out_dir, master):
    """One Spark build on `master` in a session of its own: seconds, steps, shuffle bytes."""
    from pyspark.sql import SparkSession

    from datapipe.shards.spark_pipeline import build_on_spark

    started = time.perf_counter()
    session = SparkSession.builder.master(master).appName(f"bench spark_shards {master}").getOrCreate()
    session_start_s = time.perf_counter() - started
    try:
        step_seconds = {}
        started = time.perf_counter()
        result = build_on_spark(Path(raw_dir), Path(out_dir), sorted(Path(raw_dir).glob("*.tar")), SAMPLES_PER_SHARD,
                                ImageRules(), False, DuplicateRules(), step_times_s=step_seconds)
        seconds = time.perf_counter() - started
        written, read = shuffle_bytes(session)
    finally:
        session.stop()
    samples = result["reconciliation"]["in_raw"]
    return dict(master=master, seconds=round(seconds, 2), session_start_s=round(session_start_s, 2),
                samples_in_raw=samples, kept=result["reconciliation"]["kept"],
                samples_per_s=round(samples / seconds, 1),
                step_seconds={step: round(value, 2) for step, value in step_seconds.items()},
                shuffle_write_bytes=written, shuffle_read_bytes=read,
                shuffle_write_bytes_per_sample=round(sum(written.values()) / samples, 1), shards=result["shards"])


def local_build(raw_dir, out_dir, processes):
    started = time.perf_counter()
    result = shards.build(raw_dir, out_dir, samples_per_shard=SAMPLES_PER_SHARD, processes=processes)
    seconds = time.perf_counter() - started
    samples = result["reconciliation"]["in_raw"]
    return dict(processes=processes, seconds=round(seconds, 2), samples_per_s=round(samples / seconds, 1),
                shards=result["shards"])


def measure_set(raw_dir, work_root):
    """Every build of one raw set; checks that each gives the same shards."""
    runs = {}
    for master in MASTERS:
        runs[master] = spark_build(raw_dir, Path(tempfile.mkdtemp(dir=work_root)) / "train", master)
    for processes in (1, 2):
        runs[f"local {processes}"] = local_build(raw_dir, Path(tempfile.mkdtemp(dir=work_root)) / "train", processes)
    hashes = {name: [entry["sha256"] for entry in run.pop("shards")] for name, run in runs.items()}
    if len({tuple(value) for value in hashes.values()}) != 1:
        raise SystemExit(f"error: the builds of {raw_dir} differ: {hashes}")
    one, two = runs["local[1]"], runs["local[2]"]
    return dict(spark=[one, two], local=[runs["local 1"], runs["local 2"]], same_shards=True,
                samples_in_raw=one["samples_in_raw"], spark_2_cores_vs_1=round(one["seconds"] / two["seconds"], 3),
                spark_vs_local_2_cores=round(runs["local 2"]["seconds"] / two["seconds"], 3))


def run(rows, demo_raw, out, work_root=None):
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    root = Path(tempfile.mkdtemp(prefix="bench-spark-shards-", dir=work_root))
    try:
        if not any(Path(demo_raw).glob("*.tar")):
            import demo.download

            demo.download.download_demo(demo_raw, demo_root=Path(demo_raw).parent / "source", processes=2, threads=8)
        generate(root / "generated" / "raw", rows, processes=2)
        # Not recorded: the first build in a process pays the JVM's class loading and JIT once.
        spark_build(Path(demo_raw), Path(tempfile.mkdtemp(dir=root)) / "train", MASTERS[-1])
        sets = {"demo": measure_set(Path(demo_raw), root), "generated": measure_set(root / "generated" / "raw", root)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = dict(url_list_rows_generated=rows, samples_per_shard=SAMPLES_PER_SHARD, cores=os.cpu_count(), sets=sets,
                  note="seconds exclude the Spark session's start-up (session_start_s); shuffle bytes are Spark's "
                       "stage metrics summed per step; every build of a set gives the same shard sha256s")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spark_shards.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "spark_shards.png")
    return result


def plot(result, path):
    figure, (times, shuffled) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    labels, bottoms = [], []
    steps = list(result["sets"]["generated"]["spark"][1]["step_seconds"])
    for set_name, measured in result["sets"].items():
        for run in measured["spark"]:
            labels.append(f"{set_name}\n{run['master']}")
            bottoms.append([run["step_seconds"].get(step, 0) for step in steps])
        for run in measured["local"]:
            labels.append(f"{set_name}\nlocal {run['processes']}p")
            bottoms.append([0] * len(steps) + [run["seconds"]])
    base = [0.0] * len(labels)
    for number, step in enumerate([*steps, "local build (whole)"]):
        heights = [row[number] if number < len(row) else 0 for row in bottoms]
        times.bar(labels, heights, bottom=base, label=step)
        base = [low + high for low, high in zip(base, heights, strict=True)]
    times.set_ylabel("seconds")
    times.set_title("make shards: Spark local mode by step, and the local build", fontsize=9)
    times.tick_params(axis="x", labelsize=7)
    times.legend(fontsize=6)
    generated = result["sets"]["generated"]["spark"][1]
    names = list(generated["shuffle_write_bytes"])
    shuffled.barh(names, [generated["shuffle_write_bytes"][name] / 2**20 for name in names], color="#3b75af")
    shuffled.set_xlabel("MiB written to the shuffle")
    shuffled.set_title(f"shuffle per step, generated set ({generated['samples_in_raw']} samples, local[2])",
                       fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="url-list rows of the generated set (about 80%% "
                                                                 "downloaded)")
    parser.add_argument("--demo-raw", default="shards/demo/raw")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--work-dir", help="where the builds go (default: the system's temp folder)")
    args = parser.parse_args(argv)
    result = run(args.rows, args.demo_raw, args.out, args.work_dir)
    for name, measured in result["sets"].items():
        one, two = measured["spark"]
        print(f"bench spark_shards {name} ({measured['samples_in_raw']} samples): Spark local[1] {one['seconds']} s, "
              f"local[2] {two['seconds']} s ({measured['spark_2_cores_vs_1']}x), local build on 2 processes "
              f"{measured['local'][1]['seconds']} s; shuffle {two['shuffle_write_bytes_per_sample']} bytes/sample")
    print(f"written to {Path(args.out) / 'spark_shards.json'}")


if __name__ == "__main__":
    main()
