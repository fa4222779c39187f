"""`make download`: fetch a url list into raw WebDataset shards with img2dataset.

    python -m datapipe.download --dataset demo                      # built-in, offline
    python -m datapipe.download --dataset cc3m --url-list Train_GCC-training.tsv
    python -m datapipe.download --dataset cc12m --url-list cc12m.tsv --distributor pyspark
    python -m datapipe.download --dataset cc3m --url-list x.tsv --image_size 256 --timeout 20   # img2dataset's options

Any option of img2dataset (`img2dataset.download`) may follow, under img2dataset's own name; the
dataset preset's values (datapipe/sources.py) are the defaults it overrides.

Output (`--out`, default shards/<dataset>/raw): img2dataset's {00000.tar, 00000.parquet,
00000_stats.json, ...}. The normalized url list sits beside it as urls.parquet. A killed
download resumes where it stopped (img2dataset's incremental mode skips finished shards).
img2dataset honours the noai/noimageai opt-out headers by default, and so do we.
"""

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from datapipe import download_options, url_list
from datapipe.sources import get_source


def _check_writable(folder):
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"error: cannot write to output folder '{folder}' ({error.strerror}); "
                         "choose another with OUT=<dir> or fix its permissions") from None


def _check_distributor(distributor):
    if distributor == "pyspark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise SystemExit("error: DISTRIBUTOR=pyspark needs pyspark: "
                             ".venv/bin/pip install -e '.[spark]' (and Java 17+)") from None
        # Spark's Python workers must import img2dataset: use this interpreter unless told otherwise.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    elif distributor != "multiprocessing":
        raise SystemExit(f"error: unknown distributor '{distributor}'; use multiprocessing or pyspark")


def summarize(raw_dir):
    """Totals over img2dataset's per-shard *_stats.json files."""
    totals, failures = Counter(), Counter()
    for stats_file in sorted(Path(raw_dir).glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += stats.get(key, 0)
        for reason, count in stats.get("status_dict", {}).items():
            if reason != "success":
                failures[reason] += count
    return dict(totals), dict(failures)


def run_img2dataset(urls_parquet, raw_dir, options):
    """img2dataset on the normalized url list; `options` are img2dataset keywords (preset, then the user's)."""
    from img2dataset import download  # imported here: it is slow to import (download_options set its env)

    try:
        download(url_list=str(urls_parquet), input_format="parquet", url_col="url", caption_col="caption",
                 output_folder=str(raw_dir), output_format="webdataset", **options)
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        given = " ".join(f"--{name} {value!r}" for name, value in options.items())
        raise SystemExit(f"error: img2dataset stopped ({type(error).__name__}: {error}); "
                         f"its options were: {given}") from None


def download_dataset(dataset, out, url_list_path=None, processes=2, threads=16,
                     distributor="multiprocessing", url_col=None, caption_col=None,
                     demo_root=None, demo_size=3000, img2dataset_options=None):
    """Runs the whole download; returns (totals, failures_by_reason).

    img2dataset_options: img2dataset keywords that override the preset's (and processes, threads,
    distributor when they name processes_count, thread_count, distributor).
    demo_root: where the demo set is generated (default: `source/` beside the raw folder)."""
    source = get_source(dataset)
    options = {**source.download_options, "processes_count": processes, "thread_count": threads,
               "distributor": distributor, **(img2dataset_options or {})}
    _check_distributor(options["distributor"])
    raw_dir = Path(out)
    _check_writable(raw_dir)
    urls_parquet = raw_dir.parent / "urls.parquet"
    columns = dict(url_column=url_col or source.url_column,
                   caption_column=caption_col or source.caption_column)
    if dataset == "demo" and url_list_path is None:
        from tools import demo_data, demo_server

        demo_root = Path(demo_root) if demo_root else raw_dir.parent / "source"
        items = demo_data.ensure_generated(demo_root, num_train=demo_size)
        with demo_server.serve(Path(demo_root) / "www") as base_url:
            tsv = demo_server.write_url_list(items, base_url, raw_dir.parent / "demo_urls.tsv")
            rows = url_list.normalize(tsv, urls_parquet, source.headerless_columns, **columns)
            print(f"demo: serving {rows} entries at {base_url}")
            run_img2dataset(urls_parquet, raw_dir, options)
    else:
        if url_list_path is None:
            raise SystemExit(f"error: dataset '{dataset}' needs a url list: URL_LIST=<file> "
                             f"(get it from {source.homepage or 'your data provider'})")
        rows = url_list.normalize(url_list_path, urls_parquet, source.headerless_columns, **columns)
        run_img2dataset(urls_parquet, raw_dir, options)
    totals, failures = summarize(raw_dir)
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(failures.items(), key=lambda kv: -kv[1]))
    print(f"download done: {totals.get('successes', 0)} of {totals.get('count', 0)} urls "
          f"saved to {raw_dir} ({rows} in the list); failures: {reasons or 'none'}")
    return totals, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="demo", help="demo, cc3m, cc12m or custom")
    parser.add_argument("--url-list", help="url list file (.tsv/.csv[.gz|.zst] or .parquet)")
    parser.add_argument("--out", help="raw shard folder (default shards/<dataset>/raw)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=16, help="download threads per process")
    parser.add_argument("--distributor", default="multiprocessing", help="multiprocessing or pyspark")
    parser.add_argument("--url-col", help="url column name of a url list with a header")
    parser.add_argument("--caption-col", help="caption column name of a url list with a header")
    parser.add_argument("--demo-size", type=int, default=3000, help="training pairs in the demo set")
    args, img2dataset_tokens = parser.parse_known_args(argv)
    options = download_options.parse(img2dataset_tokens) if img2dataset_tokens else {}
    # img2dataset's names for the url list's columns mean ours: the list is normalized before img2dataset reads it.
    url_col, caption_col = options.pop("url_col", args.url_col), options.pop("caption_col", args.caption_col)
    download_dataset(args.dataset, args.out or f"shards/{args.dataset}/raw", args.url_list,
                     args.processes, args.threads, args.distributor, url_col, caption_col,
                     demo_size=args.demo_size, img2dataset_options=options)


if __name__ == "__main__":
    main()
