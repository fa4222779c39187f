"""Read a url list in any of the accepted formats and write it as one parquet file for img2dataset.

Accepted: .tsv/.csv (with or without a header, optionally .gz/.zst compressed) and .parquet.
A text file has no header when its first row already holds a url; its columns then come
from the dataset preset. The user's file is never modified: the normalized copy goes to the
output folder.
"""

import csv
from pathlib import Path

import pandas as pd


class UrlListError(SystemExit):
    """A url list we cannot use; the message says why and what to do."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


TEXT_SUFFIXES = (".tsv", ".csv")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", "": None}


def _split_suffix(path):
    """('.tsv', 'zstd') for 'x.tsv.zst'; ('.parquet', None) for 'x.parquet'."""
    suffixes = path.suffixes
    compression = suffixes[-1] if suffixes and suffixes[-1] in (".gz", ".zst") else ""
    body = suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    return body, COMPRESSIONS[compression]


def _looks_like_url(value):
    return str(value).strip().lower().startswith(("http://", "https://"))


def read_url_list(path, headerless_columns):
    """A DataFrame with named columns from any accepted url-list file."""
    path = Path(path)
    if not path.is_file():
        raise UrlListError(f"url list '{path}' does not exist; pass an existing file with URL_LIST=<file>")
    if path.stat().st_size == 0:
        raise UrlListError(f"url list '{path}' is empty; it needs one row per image (url and caption)")
    body, compression = _split_suffix(path)
    if body == ".parquet":
        frame = pd.read_parquet(path)
    elif body in TEXT_SUFFIXES:
        separator = "\t" if body == ".tsv" else ","
        read = dict(sep=separator, compression=compression, dtype=str, keep_default_na=False,
                    quoting=csv.QUOTE_NONE if body == ".tsv" else csv.QUOTE_MINIMAL)
        first_row = pd.read_csv(path, header=None, nrows=1, **read)
        if first_row.empty:
            raise UrlListError(f"url list '{path}' has no rows")
        has_header = not any(_looks_like_url(value) for value in first_row.iloc[0])
        if has_header:
            frame = pd.read_csv(path, **read)
        else:
            if first_row.shape[1] != len(headerless_columns):
                raise UrlListError(
                    f"'{path}' has no header and {first_row.shape[1]} columns, but this dataset "
                    f"preset expects {len(headerless_columns)} ({', '.join(headerless_columns)}); "
                    "add a header row naming the columns, or choose the matching DATASET")
            frame = pd.read_csv(path, header=None, names=list(headerless_columns), **read)
    else:
        raise UrlListError(
            f"cannot read '{path}': use .tsv, .csv (optionally .gz or .zst) or .parquet")
    if frame.empty:
        raise UrlListError(f"url list '{path}' has a header but no rows")
    return frame


def normalize(path, out_file, headerless_columns, url_column, caption_column):
    """Write `path` as parquet with columns url and caption; returns the row count."""
    frame = read_url_list(path, headerless_columns)
    missing = [column for column in (url_column, caption_column) if column not in frame.columns]
    if missing:
        raise UrlListError(
            f"url list '{path}' has no column {' or '.join(repr(m) for m in missing)}; its columns are "
            f"{list(map(str, frame.columns))}. Name them with --url-col/--caption-col")
    frame = frame[[url_column, caption_column]].rename(columns={url_column: "url", caption_column: "caption"})
    frame["caption"] = frame["caption"].fillna("").astype(str)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out_file, index=False)
    return len(frame)
