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
import shutil
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from datapipe import download_options, url_list
from datapipe.folder_lock import FolderLock
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


# Beside the raw folder (img2dataset takes every file in it for one of its own): the list its shards were
# downloaded from, and that list's unusable rows.
URL_LIST_RECORD = "urls.json"
URL_LIST_REJECTED = "urls_rejected.jsonl"
DISK_FULL = "No space left on device"


def prepare_url_list(path, raw_dir, source, columns, schemes, fingerprint_ignores=""):
    """Normalize the url list to <raw>/../urls.parquet; refuse when raw/ holds a download of another list.

    img2dataset's incremental mode skips every shard whose stats exist, whatever list they came from, so
    a changed list would otherwise keep the old images. Returns the list's summary."""
    staging = raw_dir.parent / "urls.parquet.new"
    summary = url_list.normalize(path, staging, source.headerless_columns, schemes=schemes,
                                 rejections_file=raw_dir.parent / f"{URL_LIST_REJECTED}.new",
                                 fingerprint_ignores=fingerprint_ignores, **columns)
    record_path = raw_dir.parent / URL_LIST_RECORD
    earlier = json.loads(record_path.read_text()) if record_path.is_file() else None
    started = any(raw_dir.glob("*_stats.json")) or any(raw_dir.glob("*.tar"))
    if started and (earlier is None or earlier["fingerprint"] != summary.fingerprint):
        staging.unlink()
        (raw_dir.parent / f"{URL_LIST_REJECTED}.new").unlink()
        what = f"another url list ({earlier['source']}, {earlier['rows']} rows)" if earlier else \
            "a download whose url list is unknown"
        raise SystemExit(f"error: {raw_dir} holds {what}; {path} ({summary.rows} rows) differs. img2dataset would keep "
                         f"the old shards. Download into another OUT, or delete {raw_dir} (and the training shards "
                         f"built from it) to start over.")
    os.replace(staging, raw_dir.parent / "urls.parquet")
    os.replace(raw_dir.parent / f"{URL_LIST_REJECTED}.new", raw_dir.parent / URL_LIST_REJECTED)
    record_path.write_text(json.dumps(summary.as_dict(), indent=2))
    if summary.rejected:
        print(f"url list: {sum(summary.rejected.values())} rows set aside "
              f"({', '.join(f'{n} {reason}' for reason, n in summary.rejected.items())}); "
              f"listed in {raw_dir.parent / URL_LIST_REJECTED}")
    return summary


def check_disk_full(raw_dir):
    """Stop when img2dataset could not save images because the disk was full: it counts them as failed
    downloads. Their shards are removed, so that `make download` fetches them again once there is space."""
    full, saved_bytes, saved, shards = 0, 0, 0, []
    for parquet in sorted(raw_dir.glob("*.parquet")):
        errors = pq.read_table(parquet, columns=["error_message"])["error_message"].to_pylist()
        count = sum(DISK_FULL in (message or "") for message in errors)
        tar = parquet.with_suffix(".tar")
        if count:
            full += count
            shards.append(parquet.stem)
        elif tar.exists():
            saved_bytes += tar.stat().st_size
            saved += sum(message is None for message in errors)
    if not full:
        return
    for stem in shards:
        for path in (raw_dir / f"{stem}.tar", raw_dir / f"{stem}.parquet", raw_dir / f"{stem}_stats.json"):
            path.unlink(missing_ok=True)
    per_image = saved_bytes / saved if saved else 40_000
    raise SystemExit(f"error: the disk holding {raw_dir} is full: {full} images could not be saved ({DISK_FULL}). "
                     f"The {len(shards)} shard(s) they belong to were removed; they need about "
                     f"{full * per_image / 2**30:.1f} GiB more ({shutil.disk_usage(raw_dir).free / 2**30:.1f} GiB "
                     f"is free). Free space and run `make download` again: finished shards are kept.")


def download_dataset(dataset, out, url_list_path=None, processes=2, threads=16,
                     distributor="multiprocessing", url_col=None, caption_col=None,
                     demo_root=None, demo_size=3000, img2dataset_options=None, allow_schemes=()):
    """Runs the whole download; returns (totals, failures_by_reason).

    img2dataset_options: img2dataset keywords that override the preset's (and processes, threads,
    distributor when they name processes_count, thread_count, distributor).
    demo_root: where the demo set is generated (default: `source/` beside the raw folder).
    allow_schemes: url schemes fetched besides http and https (e.g. "file"; off by default)."""
    source = get_source(dataset)
    options = {**source.download_options, "processes_count": processes, "thread_count": threads,
               "distributor": distributor, **(img2dataset_options or {})}
    options = download_options.fit_encode_quality(options, img2dataset_options or {})
    _check_distributor(options["distributor"])
    raw_dir = Path(out)
    _check_writable(raw_dir)
    urls_parquet = raw_dir.parent / "urls.parquet"
    columns = dict(url_column=url_col or source.url_column,
                   caption_column=caption_col or source.caption_column)
    schemes = (*url_list.DEFAULT_SCHEMES, *allow_schemes)
    with FolderLock(raw_dir.parent, "another `make download`", "wait for it to end, or download into another OUT"):
        if dataset == "demo" and url_list_path is None:
            from tools import demo_data, demo_server

            demo_root = Path(demo_root) if demo_root else raw_dir.parent / "source"
            items = demo_data.ensure_generated(demo_root, num_train=demo_size)
            with demo_server.serve(Path(demo_root) / "www") as base_url:
                tsv = demo_server.write_url_list(items, base_url, raw_dir.parent / "demo_urls.tsv")
                # The server's port changes from run to run: the fingerprint leaves its address out.
                summary = prepare_url_list(tsv, raw_dir, source, columns, schemes, fingerprint_ignores=base_url)
                print(f"demo: serving {summary.rows} entries at {base_url}")
                run_img2dataset(urls_parquet, raw_dir, options)
        else:
            if url_list_path is None:
                raise SystemExit(f"error: dataset '{dataset}' needs a url list: URL_LIST=<file> "
                                 f"(get it from {source.homepage or 'your data provider'})")
            summary = prepare_url_list(url_list_path, raw_dir, source, columns, schemes)
            run_img2dataset(urls_parquet, raw_dir, options)
        check_disk_full(raw_dir)
    totals, failures = summarize(raw_dir)
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(failures.items(), key=lambda kv: -kv[1]))
    print(f"download done: {totals.get('successes', 0)} of {totals.get('count', 0)} urls "
          f"saved to {raw_dir} ({summary.rows} usable rows in the list); failures: {reasons or 'none'}")
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
    parser.add_argument("--allow-schemes", default="", help="url schemes to fetch besides http(s), e.g. file")
    args, img2dataset_tokens = parser.parse_known_args(argv)
    options = download_options.parse(img2dataset_tokens) if img2dataset_tokens else {}
    # img2dataset's names for the url list's columns mean ours: the list is normalized before img2dataset reads it.
    url_col, caption_col = options.pop("url_col", args.url_col), options.pop("caption_col", args.caption_col)
    download_dataset(args.dataset, args.out or f"shards/{args.dataset}/raw", args.url_list,
                     args.processes, args.threads, args.distributor, url_col, caption_col,
                     demo_size=args.demo_size, img2dataset_options=options,
                     allow_schemes=tuple(scheme for scheme in args.allow_schemes.split(",") if scheme))


if __name__ == "__main__":
    main()
