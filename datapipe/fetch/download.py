"""`make download`: fetch a url list into raw WebDataset shards with img2dataset.

    python -m demo.download                                    # the built-in demo set, offline
    python -m datapipe.fetch.download --dataset cc3m --url-list Train_GCC-training.tsv
    python -m datapipe.fetch.download --dataset cc12m --url-list cc12m.tsv --distributor pyspark
    python -m datapipe.fetch.download --dataset cc3m --url-list x.tsv --image_size 256 --timeout 20  # img2dataset's

Any option of img2dataset (`img2dataset.download`) may follow, under img2dataset's own name; the
dataset preset's values (datapipe/fetch/sources.py) are the defaults it overrides.

Output (`--out`, default shards/<dataset>/raw): img2dataset's {00000.tar, 00000.parquet,
00000_stats.json, ...}. The normalized url list sits beside it as urls.parquet. An s3://, gs:// or
hf:// `--out` is handed to img2dataset, which writes there itself (fsspec); the url list, its record
and the demo source then live in the local `--staging` folder. A killed
download resumes where it stopped (img2dataset's incremental mode skips finished shards).
img2dataset honours the noai/noimageai opt-out headers by default, and so do we.
"""

import argparse
import contextlib
import errno
import json
import math
import os
import re
import select
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datapipe.common.folder_lock import FolderLock
from datapipe.common.object_store import RemoteFolder, StorageError, is_remote
from datapipe.fetch import download_options, url_list
from datapipe.fetch.sources import get_source


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


def _stats_files(raw_dir):
    """The text of each img2dataset *_stats.json in a local or remote raw folder."""
    if is_remote(raw_dir):
        remote = RemoteFolder(raw_dir)
        return [remote.read_bytes(name) for name in sorted(_remote_names(raw_dir)) if name.endswith("_stats.json")]
    return [path.read_text() for path in sorted(Path(raw_dir).glob("*_stats.json"))]


def _remote_names(location):
    """Names of the objects in a remote folder; none when the folder does not exist yet (its bucket must)."""
    try:
        return set(RemoteFolder(location).sizes(missing_ok=True))
    except StorageError as error:
        raise SystemExit(f"error: {error}") from None


def check_remote_output(out, staging):
    """`out` as text when it is in object storage (else None), once a staging folder is given and its bucket and
    credentials answer: those stop the download before anything is read or fetched."""
    if not is_remote(out):
        return None
    if staging is None:
        raise SystemExit(f"error: downloading to {out} needs a local staging folder for the url list "
                         f"(--staging; make download sets it)")
    _remote_names(str(out))
    return str(out)


def summarize(raw_dir):
    """Totals over img2dataset's per-shard *_stats.json files."""
    totals, failures = Counter(), Counter()
    for text in _stats_files(raw_dir):
        stats = json.loads(text)
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += stats.get(key, 0)
        for reason, count in stats.get("status_dict", {}).items():
            if reason != "success":
                failures[reason] += count
    return dict(totals), dict(failures)


def run_img2dataset(urls_parquet, raw_dir, options, messages=None):
    """img2dataset on the normalized url list; `options` are img2dataset keywords (preset, then the user's).
    messages: the DiskFullMessages kept while it runs, named in the full-disk error."""
    from img2dataset import download  # imported here: it is slow to import (download_options set its env)

    from datapipe.fetch.img2dataset_parts import in_img2dataset

    try:
        with in_img2dataset():  # 16-bit pixels scaled to 8 bits, not clipped; an overall deadline per image
            download(url_list=str(urls_parquet), input_format="parquet", url_col="url", caption_col="caption",
                     output_folder=str(raw_dir), output_format="webdataset", **options)
    except OSError as error:
        if not _is_disk_full(error):
            raise
        raise SystemExit(f"error: the disk holding {raw_dir} is full ({error}); free space and run `make download` "
                         f"again: finished shards are kept.{messages.note() if messages else ''}") from None
    except Exception as error:  # noqa: BLE001 (any failure of img2dataset fails the command, in one line)
        given = " ".join(f"--{name} {value!r}" for name, value in options.items())
        raise SystemExit(f"error: img2dataset stopped ({type(error).__name__}: {error}); "
                         f"its options were: {given}") from None


# Beside the raw folder (img2dataset takes every file in it for one of its own): the list its shards were
# downloaded from, and that list's unusable rows.
URL_LIST_RECORD = "urls.json"
URL_LIST_REJECTED = "urls_rejected.jsonl"
DISK_FULL = "No space left on device"
DISK_FULL_LOG = "download_disk_full.log"  # img2dataset's tracebacks for a full disk (DiskFullMessages)


class DiskFullMessages:
    """What img2dataset and its workers print about a full disk, kept out of the user's terminal.

    They print a traceback and a line for every image and shard the disk had no room for: hundreds of them,
    before the download's one-line error. While `kept()` is entered, this process's stdout and stderr (which
    the workers inherit) pass through a pipe: those tracebacks (whose exception is ENOSPC, chained ones with
    them) and the "Sample/shard ... failed" lines for it are held in memory, everything else goes on to the
    terminal as it came. `save()` writes them to `log` (in the output folder), once removing the spoiled shards
    has made room for it."""

    LIMIT = 16 * 2**20  # bytes held; later messages are counted only

    def __init__(self, log):
        self.log = Path(log)
        self.messages, self.held, self.dropped, self.saved = [], 0, 0, None

    def keep(self, text):
        if self.held + len(text) > self.LIMIT:
            self.dropped += 1
        else:
            self.messages.append(text)
            self.held += len(text)

    def __len__(self):
        return len(self.messages) + self.dropped

    def save(self):
        """Write the messages to the log (once); returns the error that stopped it, or None."""
        if self.saved is None and len(self):
            try:
                self.log.write_bytes(b"".join(self.messages) + (f"({self.dropped} more messages were not kept)\n"
                                                                .encode() if self.dropped else b""))
                self.saved = ""
            except OSError as error:
                self.saved = error.strerror or str(error)
        return self.saved or None

    def note(self):
        """A sentence naming the log for an error message; empty when nothing was kept."""
        if not len(self):
            return ""
        failed = self.save()
        return (f" img2dataset's {len(self)} messages about it are in {self.log}." if failed is None else
                f" img2dataset's {len(self)} messages about it could not be kept in {self.log} ({failed}).")

    @contextlib.contextmanager
    def kept(self):
        """stdout and stderr (file descriptors 1 and 2) filtered for as long as the block runs."""
        from multiprocessing import resource_tracker

        # Started now, with the terminal's stdout and stderr: it outlives the download, and would keep the pipe open.
        resource_tracker.ensure_running()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.fstat(1), os.fstat(2)
        except OSError:  # no stdout or stderr to filter (closed)
            yield self
            return
        streams = [_FilteredStream(fd, self.keep) for fd in (1, 2)]
        # One thread for both, so that what was written to one and then the other is shown in that order.
        pump = threading.Thread(target=_pump, args=(streams,), name="download output filter", daemon=True)
        pump.start()
        try:
            yield self
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for stream in streams:  # the pipes end once the workers that inherited them have exited too
                os.dup2(stream.out, stream.fd)
            pump.join(timeout=10)
            if not pump.is_alive():
                for stream in streams:
                    os.close(stream.read)
                    os.close(stream.out)


TRACEBACK_STARTS = (b"Traceback (most recent call last):", b"Exception ignored in:")
CHAINED = (b"During handling of the above exception", b"The above exception was the direct cause")
FAILED_LINE = re.compile(rb"(Sample \S+ failed to download|shard \S+ failed with error)")
LINE_STARTS = (*TRACEBACK_STARTS, b"Sample ", b"shard ")


def _about_a_full_disk(text):
    return DISK_FULL.encode() in text or b"[Errno 28]" in text


IDLE_S = 0.3  # a line begun and not finished for this long goes on as it is (tqdm's progress bar)


def _pump(streams):
    """Read the streams' pipes until every writer has closed them."""
    reading = {stream.read: stream for stream in streams}
    while reading:
        for read in select.select(list(reading), [], [], IDLE_S)[0]:
            data = os.read(read, 1 << 16)
            if data:
                reading[read].feed(data)
            else:
                reading.pop(read).idle(final=True)
        for stream in reading.values():
            if time.monotonic() - stream.last_read > IDLE_S:
                stream.idle()


class _FilteredStream:
    """File descriptor `fd` redirected to a pipe, which `_pump` reads: full-disk tracebacks and failure lines go to
    `keep`, everything else to where `fd` pointed before (`out`)."""

    def __init__(self, fd, keep):
        self.fd, self.keep = fd, keep
        self.out = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.read, self.last_read = read, time.monotonic()
        self.tail, self.block, self.block_ended = b"", None, False

    def feed(self, data):
        self.last_read = time.monotonic()
        *lines, self.tail = (self.tail + data).split(b"\n")
        for line in lines:
            self._line(line + b"\n")
        if self.tail and self.block is None and not self._may_begin_a_message(self.tail):
            self._forward(self.tail)
            self.tail = b""

    @staticmethod
    def _may_begin_a_message(tail):
        """Whether an unfinished line may be (or end with the beginning of) a message to keep."""
        return any(tail.startswith(start) or start.startswith(tail) for start in LINE_STARTS) or any(
            start in tail or any(tail.endswith(start[:size]) for size in range(1, len(start)))
            for start in TRACEBACK_STARTS)

    def idle(self, final=False):
        """Nothing came for a while (or ever will, `final`): what is held and finished, or cannot be, goes on."""
        if self.block is not None and (self.block_ended or final):
            if final and self.tail:
                self.block.append(self.tail)
                self.tail = b""
            self._end_block()
        if self.tail and self.block is None:
            self._forward(self.tail)
            self.tail = b""

    def _line(self, line):
        if self.block is not None:
            if not self.block_ended:  # until its exception's line, which is not indented
                self.block.append(line)
                self.block_ended = not (line[:1] in (b" ", b"\t") or not line.strip() or line.startswith(
                    (*TRACEBACK_STARTS, *CHAINED)))
                return
            if not line.strip() or line.startswith(CHAINED):  # perhaps a chained traceback follows
                self.block.append(line)
                self.block_ended = not line.startswith(CHAINED)
                return
            self._end_block()
        starts = [at for at in (line.find(start) for start in TRACEBACK_STARTS) if at >= 0]
        if starts:
            self._forward(line[:min(starts)])  # what a progress bar wrote before it, on the same line
            self.block, self.block_ended = [line[min(starts):]], False
        elif FAILED_LINE.match(line) and _about_a_full_disk(line):
            self.keep(line)
        else:
            self._forward(line)

    def _end_block(self):
        block, self.block, self.block_ended = b"".join(self.block), None, False
        exceptions = [line for line in block.splitlines() if line.strip() and line[:1] not in (b" ", b"\t")
                      and not line.startswith((*TRACEBACK_STARTS, *CHAINED))]
        if any(_about_a_full_disk(line) for line in exceptions):
            self.keep(block)
        else:
            self._forward(block)

    def _forward(self, data):
        while data:
            try:
                data = data[os.write(self.out, data):]
            except OSError:  # the terminal is gone: nothing more can be shown
                return


def prepare_url_list(path, raw_dir, source, columns, schemes, fingerprint_ignores="", output=None):
    """Normalize the url list to <raw>/../urls.parquet; refuse when raw/ (or the remote `output` img2dataset
    writes to) holds a download of another list.

    img2dataset's incremental mode skips every shard whose stats exist, whatever list they came from, so
    a changed list would otherwise keep the old images. Returns the list's summary."""
    staging = raw_dir.parent / "urls.parquet.new"
    summary = url_list.normalize(path, staging, source.headerless_columns, schemes=schemes,
                                 rejections_file=raw_dir.parent / f"{URL_LIST_REJECTED}.new",
                                 fingerprint_ignores=fingerprint_ignores, **columns)
    record_path = raw_dir.parent / URL_LIST_RECORD
    earlier = json.loads(record_path.read_text()) if record_path.is_file() else None
    if output is not None:
        started = any(name.endswith(("_stats.json", ".tar")) for name in _remote_names(output))
    else:
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


def _is_disk_full(error):
    return getattr(error, "errno", None) == errno.ENOSPC or DISK_FULL in str(error)


def _size(size_bytes):
    return f"{size_bytes / 2**30:.1f} GiB" if size_bytes >= 2**30 else f"{max(size_bytes / 2**20, 0.1):.1f} MiB"


def _error_messages(parquet):
    """img2dataset's error message per url of one shard; None when its parquet cannot be read (left spoiled)."""
    try:
        return pq.read_table(parquet, columns=["error_message"])["error_message"].to_pylist()
    except (OSError, KeyError, pa.ArrowException):
        return None


def check_finished(raw_dir, rows, samples_per_shard, shard_digits=5, messages=None):
    """Stop when img2dataset left a shard unfinished (no _stats.json: its worker failed and img2dataset only
    printed why), spoiled (a parquet that cannot be read) or without the images the disk had no room for
    (img2dataset counts those as failed downloads). Those shards' files are removed, so that `make download`
    fetches them again; finished shards stay. messages: the DiskFullMessages kept during the download, saved
    once the removal has made room and named in the message."""
    spoiled, full, saved_bytes, saved = {}, 0, 0, 0  # spoiled: shard name -> urls in it
    for shard_id in range(math.ceil(rows / samples_per_shard)):
        name = f"{shard_id:0{shard_digits}d}"
        urls = min(samples_per_shard, rows - shard_id * samples_per_shard)
        errors = _error_messages(raw_dir / f"{name}.parquet") if (raw_dir / f"{name}_stats.json").exists() else None
        if errors is None:
            spoiled[name] = urls
            continue
        count = sum(DISK_FULL in (message or "") for message in errors)
        if count:
            full += count
            spoiled[name] = urls
        elif (raw_dir / f"{name}.tar").exists():
            saved_bytes += (raw_dir / f"{name}.tar").stat().st_size
            saved += sum(message is None for message in errors)
    if not spoiled:
        return
    for name in spoiled:
        for path in (raw_dir / f"{name}.tar", raw_dir / f"{name}.parquet", raw_dir / f"{name}_stats.json"):
            path.unlink(missing_ok=True)
    needed = sum(spoiled.values()) * (saved_bytes / saved if saved else 40_000)
    free = shutil.disk_usage(raw_dir).free
    names = ", ".join(sorted(spoiled)[:5]) + (", ..." if len(spoiled) > 5 else "")
    if full or free < needed or messages:
        raise SystemExit(f"error: the disk holding {raw_dir} is full" + (f": {full} images could not be saved "
                         f"({DISK_FULL})" if full else "") + f". The {len(spoiled)} shard(s) it spoiled ({names}) were "
                         f"removed; they need about {_size(needed)} ({_size(free)} is free). Free space and run "
                         f"`make download` again: finished shards are kept.{messages.note() if messages else ''}")
    raise SystemExit(f"error: img2dataset did not finish {len(spoiled)} of {math.ceil(rows / samples_per_shard)} "
                     f"shard(s) ({names}; its messages above say why) and they were removed. Fix the cause and run "
                     "`make download` again: finished shards are kept.")


def download_dataset(dataset, out, url_list_path=None, processes=2, threads=16,
                     distributor="multiprocessing", url_col=None, caption_col=None,
                     img2dataset_options=None, allow_schemes=(), fingerprint_ignores="", staging=None):
    """Runs the whole download; returns (totals, failures_by_reason).

    img2dataset_options: img2dataset keywords that override the preset's (and processes, threads,
    distributor when they name processes_count, thread_count, distributor).
    allow_schemes: url schemes fetched besides http and https (e.g. "file"; off by default).
    fingerprint_ignores: a url prefix that does not make the list another one (the demo server's address).
    staging: the local folder for the url list and its records when `out` is in object storage."""
    source = get_source(dataset)
    if url_list_path is None:
        raise SystemExit(f"error: dataset '{dataset}' needs a url list: URL_LIST=<file> "
                         f"(get it from {source.homepage or 'your data provider'})")
    options = {**source.download_options, "processes_count": processes, "thread_count": threads,
               "distributor": distributor, **(img2dataset_options or {})}
    options = download_options.fit_encode_quality(options, img2dataset_options or {})
    download_options.check_values(options)
    _check_distributor(options["distributor"])
    output = check_remote_output(out, staging)  # img2dataset writes to object storage itself
    raw_dir = Path(staging) / "raw" if output is not None else Path(out)
    _check_writable(raw_dir)
    columns = dict(url_column=url_col or source.url_column,
                   caption_column=caption_col or source.caption_column)
    schemes = (*url_list.DEFAULT_SCHEMES, *allow_schemes)
    with FolderLock(raw_dir.parent, "another `make download`", "wait for it to end, or download into another OUT"):
        try:
            summary = prepare_url_list(url_list_path, raw_dir, source, columns, schemes, fingerprint_ignores,
                                       output=output)
        except OSError as error:
            if not _is_disk_full(error):
                raise
            for partial in (*raw_dir.parent.glob("urls.parquet.new*"), raw_dir.parent / f"{URL_LIST_REJECTED}.new"):
                partial.unlink(missing_ok=True)
            raise SystemExit(f"error: the disk holding {raw_dir.parent} is full: the normalized url list could not be "
                             f"written there ({DISK_FULL}). It needs about {_size(Path(url_list_path).stat().st_size)} "
                             f"and the images far more; free space or choose another OUT") from None
        if options["distributor"] == "multiprocessing":
            # img2dataset starts every process of its pool up front, each importing img2dataset, however short
            # the list: more processes than the list has shards would only start, wait and stop.
            shards_in_list = max(1, math.ceil(summary.rows / options["number_sample_per_shard"]))
            options["processes_count"] = min(options["processes_count"], shards_in_list)
        # Its workers' tracebacks for a full disk are kept from the terminal (not Spark's: its JVM outlives this).
        messages = DiskFullMessages(raw_dir.parent / DISK_FULL_LOG)
        with messages.kept() if options["distributor"] == "multiprocessing" else contextlib.nullcontext():
            run_img2dataset(raw_dir.parent / "urls.parquet", output or raw_dir, options, messages)
            if output is None:  # img2dataset saves locally only here
                check_finished(raw_dir, summary.rows, options["number_sample_per_shard"],
                               options.get("oom_shard_count", 5), messages)
        if messages and messages.save() is None:  # a full disk that spoiled no shard in the end
            print(f"note: img2dataset's {len(messages)} messages about a full disk are in {messages.log}")
    totals, failures = summarize(output or raw_dir)
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(failures.items(), key=lambda kv: -kv[1]))
    print(f"download done: {totals.get('successes', 0)} of {totals.get('count', 0)} urls "
          f"saved to {output or raw_dir} ({summary.rows} usable rows in the list); failures: {reasons or 'none'}")
    return totals, failures


def command_parser(description=__doc__):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="demo", help="demo, cc3m, cc12m or custom")
    parser.add_argument("--url-list", help="url list file (.tsv/.csv[.gz|.zst] or .parquet)")
    parser.add_argument("--out", help="raw shard folder (default shards/<dataset>/raw)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=16, help="download threads per process")
    parser.add_argument("--distributor", default="multiprocessing", help="multiprocessing or pyspark")
    parser.add_argument("--url-col", help="url column name of a url list with a header")
    parser.add_argument("--caption-col", help="caption column name of a url list with a header")
    parser.add_argument("--allow-schemes", default="", help="url schemes to fetch besides http(s), e.g. file")
    parser.add_argument("--staging", help="local folder for the url list when --out is s3://, gs:// or hf://")
    return parser


def command_keywords(args, img2dataset_tokens):
    """download_dataset's keywords from command_parser's arguments and the img2dataset options after them."""
    options = download_options.parse(img2dataset_tokens) if img2dataset_tokens else {}
    # img2dataset's names for the url list's columns mean ours: the list is normalized before img2dataset reads it.
    url_col, caption_col = options.pop("url_col", args.url_col), options.pop("caption_col", args.caption_col)
    return dict(dataset=args.dataset, out=args.out or f"shards/{args.dataset}/raw", url_list_path=args.url_list,
                processes=args.processes, threads=args.threads, distributor=args.distributor, url_col=url_col,
                caption_col=caption_col, img2dataset_options=options,
                allow_schemes=tuple(scheme for scheme in args.allow_schemes.split(",") if scheme),
                staging=args.staging)


def main(argv=None):
    download_dataset(**command_keywords(*command_parser().parse_known_args(argv)))


if __name__ == "__main__":
    main()
