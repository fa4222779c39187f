"""Read a url list in any of the accepted formats and write it as one parquet file for img2dataset.

Accepted: .tsv/.csv (with or without a header, optionally .gz/.zst compressed) and .parquet.
A text file has no header when its first row already holds a url; its columns then come
from the dataset preset. The user's file is never modified: the normalized copy goes to the
output folder. It is read as a stream, so a 12M-row list takes little memory.

A quoted CSV field may hold newlines (RFC 4180); its row keeps the number of its first line.
A row that cannot be used (wrong number of columns, bytes that are not UTF-8, a broken quote, no
url, a url whose scheme is not http(s) unless allowed) is set aside with its line number and
reason, counted, and logged; a handful of them never stop the job. A url that an earlier row already
has is set aside too (`duplicate_url`): each url is fetched once. A file with no usable rows, or
mostly unusable ones (wrong format or columns), is an error that names the file, a line and the fix.
"""

import csv
import gzip
import hashlib
import io
import json
import os
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
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
# A quote still open after this many lines is a broken quote, not a caption holding newlines.
MAX_RECORD_LINES = 100
CSV_QUOTE_OPEN = "unexpected end of data"  # csv.Error's message (strict mode) when the input ends inside quotes


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


def _text_lines(path, compression):
    """(line number, text or None, problem) for every line of a text file, blank ones included."""
    with _open_binary(path, compression) as stream:
        for number, raw_line in enumerate(stream, start=1):
            try:
                yield number, raw_line.rstrip(b"\r\n").decode("utf-8"), None
            except UnicodeDecodeError as error:
                yield number, None, ("not_utf8", f"bytes that are not UTF-8 at column {error.start + 1}")


def _text_rows(path, body, compression):
    """(line number, fields or None, problem) for every non-blank row of a text url list."""
    lines = _text_lines(path, compression)
    if body == ".csv":
        yield from _csv_records(lines)
        return
    for number, line, problem in lines:  # CC3M/CC12M: tabs separate, quotes are ordinary characters
        if problem is not None or line.strip():
            yield number, None if problem else line.split("\t"), problem


def _csv_records(lines):
    """(number of its first line, fields, None) per CSV record, or (line number, None, problem). A quoted field
    may run over several lines; a quote that never closes into a well-formed record makes its first line one
    bad row, and reading goes on at the line after it."""
    lines, pending = iter(lines), deque()  # pending: lines read ahead, not yet given to a record

    def read_ahead():
        line = next(lines, None)
        if line is not None:
            pending.append(line)
        return line is not None

    while pending or read_ahead():
        number, text, problem = pending[0]
        if problem is not None or not text.strip():
            pending.popleft()
            if problem is not None:
                yield number, None, problem
            continue
        span, fields = 1, None  # span: how many pending lines the record is tried on
        while span is not None:
            try:
                fields = next(csv.reader([pending[index][1] + "\n" for index in range(span)], strict=True))
                break
            except csv.Error as error:
                broken = error
            span = _through_next_quote(pending, span, read_ahead) if str(broken) == CSV_QUOTE_OPEN else None
        if fields is None:
            pending.popleft()
            yield number, None, ("bad_quoting", f"{broken}: {text[:80]!r}")
            continue
        for _ in range(span):
            pending.popleft()
        yield number, fields, None


def _through_next_quote(pending, span, read_ahead):
    """The span that takes the lines after the first `span` up to the next one holding a quote, the only kind
    that can close an open quote; None when no such line comes within MAX_RECORD_LINES or before a line that is
    not text. Each record is parsed about once however many lines its quote stays open."""
    while span < MAX_RECORD_LINES and (span < len(pending) or read_ahead()):
        _, text, problem = pending[span]
        if problem is not None:
            return None
        span += 1
        if '"' in text:
            return span
    return None


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
    if path.is_dir():
        readable = (*TEXT_SUFFIXES, ".parquet", *COMPRESSIONS)
        inside = sorted(name.name for name in path.iterdir() if name.suffix in readable)
        raise UrlListError(f"url list '{path}' is a folder; pass the url list file itself with URL_LIST=<file>"
                           + (f" (it holds {', '.join(inside[:3])})" if inside else ""))
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
    url_hashes, line_numbers = array("q"), array("Q")  # per usable row, to find repeated urls afterwards
    with pq.ParquetWriter(partial, schema) as writer, open(rejections_file, "w") as rejections:
        urls, captions = [], []
        for number, fields, problem in rows:
            if columns is None and problem is None:  # the first row: a header, or already data
                has_header = body == ".parquet" or _is_header(fields, url_column, caption_column)
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
            url_hashes.append(hash(url))
            line_numbers.append(number)
            digest.update(f"{url.removeprefix(fingerprint_ignores)}\t{caption}\n".encode())
            if len(urls) == WRITE_BATCH_ROWS:
                writer.write_table(pa.table([urls, captions], schema=schema))
                summary.rows += len(urls)
                urls, captions = [], []
        if urls:
            writer.write_table(pa.table([urls, captions], schema=schema))
            summary.rows += len(urls)
    _check_whole_file(path, summary, swapped, partial)
    _drop_repeated_urls(path, partial, rejections_file, summary, url_hashes, line_numbers)
    os.replace(partial, out_file)
    summary.fingerprint = digest.hexdigest()
    return summary


def _is_header(fields, url_column, caption_column):
    """A first row without a url is a header when it names our columns, or names every column: a row with an
    empty field (a data row whose url is empty) is data."""
    if any(_looks_like_url(value) for value in fields):
        return False
    return url_column in fields or caption_column in fields or all(value.strip() for value in fields)


def _drop_repeated_urls(path, parquet, rejections_file, summary, url_hashes, line_numbers):
    """Rewrite `parquet` without the rows whose url an earlier row has, each logged as `duplicate_url`.
    Only urls whose hash repeats are compared as text, so the memory this takes grows with the repeats."""
    hashes = np.frombuffer(url_hashes, dtype=np.int64)
    values, counts = np.unique(hashes, return_counts=True)
    repeated = set(values[counts > 1].tolist())
    if not repeated:
        return
    first_line, row_number = {}, 0  # first_line: url -> line number of its first row, for urls whose hash repeats
    kept = parquet.with_name(parquet.name + ".unique")
    with pq.ParquetWriter(kept, pq.read_schema(parquet)) as writer, open(rejections_file, "a") as rejections:
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=WRITE_BATCH_ROWS):
            keep = np.ones(batch.num_rows, dtype=bool)
            batch_hashes = hashes[row_number:row_number + batch.num_rows].tolist()
            for index, url in enumerate(batch.column("url").to_pylist()):
                if batch_hashes[index] not in repeated:
                    continue
                number = line_numbers[row_number + index]
                if url not in first_line:
                    first_line[url] = number
                    continue
                keep[index] = False
                rejection = {"stage": "url_list", "key": f"line {number}", "url": url, "reason": "duplicate_url",
                             "detail": f"{path.name} line {number}: the same url as line {first_line[url]}"}
                rejections.write(json.dumps(rejection, ensure_ascii=False) + "\n")
            row_number += batch.num_rows
            writer.write_table(pa.Table.from_batches([batch.filter(pa.array(keep))]))
            dropped = int((~keep).sum())
            summary.rows -= dropped
            if dropped:
                summary.rejected["duplicate_url"] += dropped
    os.replace(kept, parquet)


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

