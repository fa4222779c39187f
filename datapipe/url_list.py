"""Read a url list in any of the accepted formats and write it as one parquet file for img2dataset.

Accepted: .tsv/.csv (with or without a header, optionally .gz/.zst compressed) and .parquet.
A text file has no header when its first row already holds a url; its columns then come
from the dataset preset. The user's file is never modified: the normalized copy goes to the
output folder. It is read as a stream, so a 12M-row list takes little memory.

A row that cannot be used (wrong number of columns, bytes that are not UTF-8, a broken quote, no
url, a url whose scheme is not http(s) unless allowed) is set aside with its line number and
reason, counted, and logged; a handful of them never stop the job. A file with no usable rows, or
mostly unusable ones (wrong format or columns), is an error that names the file, a line and the fix.
"""

import csv
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard


class UrlListError(SystemExit):
    """A url list we cannot use; the message says why and what to do."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


TEXT_SUFFIXES = (".tsv", ".csv")
COMPRESSIONS = (".gz", ".zst")
DEFAULT_SCHEMES = ("http", "https")
WRITE_BATCH_ROWS = 100_000
MOSTLY_BAD = 0.5  # more unusable rows than this share: the file or its columns are not what we think


@dataclass
class UrlListSummary:
    """What normalizing a url list found: kept rows, rows set aside (by reason; the first as an example) and
    a fingerprint of the kept rows, which tells whether a download came from this list."""

    source: str = ""
    rows: int = 0
    rejected: Counter = field(default_factory=Counter)
    first_rejection: dict | None = None
    fingerprint: str = ""

    def as_dict(self):
        return {"source": self.source, "rows": self.rows, "rejected": dict(sorted(self.rejected.items())),
                "fingerprint": self.fingerprint}


def _split_suffix(path):
    """('.tsv', '.zst') for 'x.tsv.zst'; ('.parquet', '') for 'x.parquet'."""
    suffixes = path.suffixes
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    body = suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    return body, compression


def _open_binary(path, compression):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _looks_like_url(value):
    return str(value).strip().lower().startswith(("http://", "https://", "file://", "ftp://"))


def _text_rows(path, body, compression):
    """(line number, fields or None, problem) for every non-blank line of a text url list."""
    separator = "\t" if body == ".tsv" else ","
    with _open_binary(path, compression) as stream:
        for number, raw_line in enumerate(stream, start=1):
            raw_line = raw_line.rstrip(b"\r\n")
            if not raw_line.strip():
                continue
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, None, ("not_utf8", f"bytes that are not UTF-8 at column {error.start + 1}")
                continue
            if body == ".tsv":  # CC3M/CC12M: tabs separate, quotes are ordinary characters
                yield number, line.split(separator), None
                continue
            try:
                yield number, next(csv.reader([line], strict=True)), None
            except csv.Error as error:
                yield number, None, ("bad_quoting", f"{error}: {line[:80]!r}")


def _parquet_rows(path):
    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    yield 0, columns, None  # the header
    number = 0
    for batch in table.iter_batches(batch_size=WRITE_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield number, ["" if row[name] is None else str(row[name]) for name in columns], None


def _check_url(url, schemes):
    """None when `url` can be fetched, else (reason, detail)."""
    if not url:
        return "missing_url", "the url is empty"
    scheme = urlsplit(url).scheme.lower()
    if scheme not in schemes:
        return "url_scheme", (f"{scheme or 'no'} scheme: only {', '.join(schemes)} urls are fetched (allow others "
                              f"with --allow-schemes)")
    if not urlsplit(url).netloc and scheme in ("http", "https"):
        return "bad_url", f"no host in {url[:80]!r}"
    return None


def normalize(path, out_file, headerless_columns, url_column, caption_column, schemes=DEFAULT_SCHEMES,
              rejections_file=None, fingerprint_ignores=""):
    """Write `path` as parquet with columns url and caption; returns a UrlListSummary. Unusable rows go to
    `rejections_file` (default: beside out_file), one JSON line each, as they are found.
    fingerprint_ignores: a url prefix left out of the fingerprint (the demo server's address, new each run)."""
    path = Path(path)
    if not path.is_file():
        raise UrlListError(f"url list '{path}' does not exist; pass an existing file with URL_LIST=<file>")
    if path.stat().st_size == 0:
        raise UrlListError(f"url list '{path}' is empty; it needs one row per image (url and caption)")
    body, compression = _split_suffix(path)
    if body == ".parquet" and not compression:
        rows = _parquet_rows(path)
    elif body in TEXT_SUFFIXES:
        rows = _text_rows(path, body, compression)
    else:
        raise UrlListError(f"cannot read '{path}': use .tsv, .csv (optionally .gz or .zst) or .parquet")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    rejections_file = Path(rejections_file or out_file.with_name("url_list_rejected.jsonl"))
    summary, digest, swapped = UrlListSummary(source=str(path)), hashlib.sha256(), 0
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    columns = positions = None
    with pq.ParquetWriter(partial, schema) as writer, open(rejections_file, "w") as rejections:
        urls, captions = [], []
        for number, fields, problem in rows:
            if columns is None and problem is None:  # the first row: a header, or already data
                has_header = body == ".parquet" or not any(_looks_like_url(value) for value in fields)
                columns = fields if has_header else list(headerless_columns)
                positions = _column_positions(path, columns, url_column, caption_column, has_header)
                if has_header:
                    continue
            if problem is None and len(fields) != len(columns):
                problem = ("wrong_column_count", f"{len(fields)} fields, the list has {len(columns)} "
                                                 f"({', '.join(map(str, columns))})")
            if problem is None:
                url, caption = fields[positions[0]].strip(), fields[positions[1]]
                problem = _check_url(url, schemes)
                swapped += problem is not None and _looks_like_url(caption)
            if problem is not None:
                summary.rejected[problem[0]] += 1
                rejection = {"stage": "url_list", "key": f"line {number}", "url": "", "reason": problem[0],
                             "detail": f"{path.name} line {number}: {problem[1]}"}
                summary.first_rejection = summary.first_rejection or rejection
                rejections.write(json.dumps(rejection, ensure_ascii=False) + "\n")
                continue
            urls.append(url)
            captions.append(caption)
            digest.update(f"{url.removeprefix(fingerprint_ignores)}\t{caption}\n".encode())
            if len(urls) == WRITE_BATCH_ROWS:
                writer.write_table(pa.table([urls, captions], schema=schema))
                summary.rows += len(urls)
                urls, captions = [], []
        if urls:
            writer.write_table(pa.table([urls, captions], schema=schema))
            summary.rows += len(urls)
    _check_whole_file(path, summary, swapped, partial)
    os.replace(partial, out_file)
    summary.fingerprint = digest.hexdigest()
    return summary


def _column_positions(path, columns, url_column, caption_column, has_header):
    missing = [name for name in (url_column, caption_column) if name not in columns]
    if missing:
        raise UrlListError(
            f"url list '{path}' has no column {' or '.join(repr(m) for m in missing)}; its columns are "
            f"{list(map(str, columns))}" + (". Name them with --url-col/--caption-col" if has_header else
                                            ". Choose the matching DATASET (cc3m: caption<TAB>url, cc12m: "
                                            "url<TAB>caption) or add a header row"))
    return columns.index(url_column), columns.index(caption_column)


def _check_whole_file(path, summary, swapped, partial):
    bad = sum(summary.rejected.values())
    problem = None
    if summary.rows == 0 and bad == 0:
        problem = f"url list '{path}' has no rows (only blank lines or a header); it needs one row per image"
    elif bad > MOSTLY_BAD * (summary.rows + bad):
        first = summary.first_rejection
        problem = f"url list '{path}': {bad} of {summary.rows + bad} rows cannot be used ({first['detail']}). "
        problem += ("Its columns look swapped: the caption column holds the urls. Choose the matching DATASET "
                    "(cc3m: caption<TAB>url, cc12m: url<TAB>caption) or name the columns with --url-col/--caption-col"
                    if swapped > bad / 2 else "Check its format and columns (DATASET, --url-col, --caption-col)")
    if problem:
        partial.unlink(missing_ok=True)
        raise UrlListError(problem)

