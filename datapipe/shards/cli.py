"""The command line of `make shards` and `make verify` (python -m datapipe.shards build|verify)."""

import argparse
import dataclasses
import os

from datapipe import shards
from datapipe.common.validate import ImageRules
from datapipe.shards.inputs import BuildError, exclude_paths
from datapipe.shards.pipeline import DISTRIBUTORS, build
from datapipe.shards.screen import DuplicateRules
from datapipe.shards.verification import verify


def main(argv=None):
    parser = argparse.ArgumentParser(description=shards.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="raw img2dataset shards -> training shards")
    build_parser.add_argument("raw_dir")
    build_parser.add_argument("out_dir")
    build_parser.add_argument("--samples-per-shard", type=int, default=10000)
    build_parser.add_argument("--processes", type=int, default=os.cpu_count())
    build_parser.add_argument("--compress", action="store_true",
                              help="write .tar.zst (smaller; torch loader only, no DALI index)")
    for field in dataclasses.fields(ImageRules):
        build_parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                                  default=field.default, help=f"default {field.default}")
    defaults = DuplicateRules()
    build_parser.add_argument("--near-duplicate-bits", type=int, default=defaults.near_duplicate_bits,
                              help="drop images whose perceptual hash is within this many of 64 bits of an earlier "
                                   f"kept image; -1 keeps near duplicates (default {defaults.near_duplicate_bits})")
    build_parser.add_argument("--eval-overlap-bits", type=int, default=defaults.eval_overlap_bits,
                              help="the same against the --exclude images (default "
                                   f"{defaults.eval_overlap_bits})")
    build_parser.add_argument("--eval-overlap-fine-bits", type=int, default=defaults.eval_overlap_fine_bits,
                              help="how far (of 256 bits) the confirming fine pHash of a training image may be from "
                                   "an --exclude image's: higher catches more edited copies, at some risk of "
                                   "dropping look-alikes (make bench-dedup measures both; default "
                                   f"{defaults.eval_overlap_fine_bits})")
    build_parser.add_argument("--exclude", default="",
                              help="evaluation images training must not contain: folders, images or .tar shards, "
                                   "separated by ':'; write a ':' inside a path as '\\:' (make shards EXCLUDE=...)")
    build_parser.add_argument("--distributor", default="multiprocessing", choices=DISTRIBUTORS,
                              help="multiprocessing: --processes on this machine; pyspark: on Spark, the same result "
                                   "(docs/spark.md; needs pyspark and Java 17+)")
    build_parser.add_argument("--spark-master", default=os.environ.get("SPARK_MASTER"),
                              help="the Spark master with --distributor pyspark: local[N], spark://host:7077, yarn, "
                                   "k8s://... (default: $SPARK_MASTER, else spark-submit's, else local[*])")
    verify_parser = commands.add_parser("verify", help="re-check hashes, counts and indexes")
    verify_parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            rules = ImageRules(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ImageRules)})
            duplicates = DuplicateRules(args.near_duplicate_bits, args.eval_overlap_bits,
                                        exclude_paths(args.exclude), args.eval_overlap_fine_bits)
        except ValueError as error:
            raise BuildError(str(error)) from None
        build(args.raw_dir, args.out_dir, args.samples_per_shard, args.processes, rules, args.compress, duplicates,
              args.distributor, args.spark_master)
    else:
        problems = verify(args.out_dir)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            raise SystemExit(f"verify failed: {len(problems)} problem(s) in {args.out_dir}")
        print(f"verify ok: every shard in {args.out_dir} matches its manifest and DALI index")
