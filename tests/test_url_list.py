import json

import pandas as pd
import pytest
import zstandard

from datapipe.fetch import url_list
from datapipe.fetch.sources import SOURCES

CC3M_ROWS = "a dog on a beach\thttp://example.invalid/1.jpg\nthe sky\thttp://example.invalid/2.jpg\n"
CC12M_ROWS = "http://example.invalid/1.jpg\ta dog on a beach\nhttp://example.invalid/2.jpg\tthe sky\n"


def normalized(tmp_path, path, source="custom", url_col="url", caption_col="caption"):
    out = tmp_path / "out" / "urls.parquet"
    url_list.normalize(path, out, SOURCES[source].headerless_columns, url_col, caption_col)
    return pd.read_parquet(out)


@pytest.mark.parametrize("source, rows", [("cc3m", CC3M_ROWS), ("cc12m", CC12M_ROWS)])
def test_official_headerless_tsvs(tmp_path, source, rows):
    path = tmp_path / "list.tsv"
    path.write_text(rows)
    frame = normalized(tmp_path, path, source)
    assert list(frame["url"]) == ["http://example.invalid/1.jpg", "http://example.invalid/2.jpg"]
    assert list(frame["caption"]) == ["a dog on a beach", "the sky"]
    assert path.read_text() == rows  # the user's file is left as it was


def test_compressed_tsv_and_named_columns(tmp_path):
    path = tmp_path / "list.tsv.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"TEXT\tURL\nhello\thttp://example.invalid/a.jpg\n"))
    frame = normalized(tmp_path, path, url_col="URL", caption_col="TEXT")
    assert frame.to_dict("records") == [{"url": "http://example.invalid/a.jpg", "caption": "hello"}]


def test_csv_and_parquet_with_headers(tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text('url,caption\nhttp://example.invalid/a.jpg,"a, b"\n')
    assert normalized(tmp_path, csv_path)["caption"].tolist() == ["a, b"]
    parquet = tmp_path / "list.parquet"
    pd.DataFrame({"url": ["http://example.invalid/a.jpg"], "caption": ["x"]}).to_parquet(parquet)
    assert len(normalized(tmp_path, parquet)) == 1


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ("url\tcaption\n", "no rows"),
    ("link\ttext\nhttp://example.invalid/a.jpg\thi\n", "has no column 'url'"),
    ("a\tb\thttp://example.invalid/a.jpg\n", "3 fields, the list has 2"),
    ("\n\n   \n\n", "no rows"),
])
def test_clear_errors(tmp_path, content, message):
    path = tmp_path / "list.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=message) as caught:
        normalized(tmp_path, path)
    assert str(path) in str(caught.value)


def test_unknown_format(tmp_path):
    path = tmp_path / "list.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(SystemExit, match="use .tsv, .csv"):
        normalized(tmp_path, path)


def test_bad_rows_are_set_aside_with_their_line_and_reason(tmp_path):
    """A handful of bad rows in a long list: counted and logged with their line numbers; the job goes on."""
    good = [f"caption {i}\thttp://example.invalid/{i}.jpg\n".encode() for i in range(20)]
    bad = [b"one\ttwo\thttp://example.invalid/x.jpg\n",  # an extra column
           "caf\xe9 in latin-1\thttp://example.invalid/y.jpg\n".encode("latin-1"),  # not UTF-8
           b"no url here\t\n",  # missing url
           b"a local file\tfile:///etc/passwd\n"]  # a scheme we do not fetch
    path = tmp_path / "list.tsv"
    path.write_bytes(b"".join(good[:5] + bad + [b"\n"] + good[5:]))
    out, rejections = tmp_path / "out" / "urls.parquet", tmp_path / "rejected.jsonl"
    summary = url_list.normalize(path, out, SOURCES["cc3m"].headerless_columns, "url", "caption",
                                 rejections_file=rejections)
    assert summary.rows == 20 and len(pd.read_parquet(out)) == 20
    assert dict(summary.rejected) == {"wrong_column_count": 1, "not_utf8": 1, "missing_url": 1, "url_scheme": 1}
    logged = [json.loads(line) for line in rejections.read_text().splitlines()]
    assert [row["key"] for row in logged] == ["line 6", "line 7", "line 8", "line 9"]
    assert all(row["stage"] == "url_list" and "list.tsv line" in row["detail"] for row in logged)


def test_a_broken_quote_in_a_csv_is_one_bad_row(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text('url,caption\nhttp://example.invalid/a.jpg,fine\nhttp://example.invalid/b.jpg,"unterminated\n'
                    'http://example.invalid/c.jpg,"quoted, with a comma"\n')
    summary = url_list.normalize(path, tmp_path / "urls.parquet", ("url", "caption"), "url", "caption")
    assert summary.rows == 2 and dict(summary.rejected) == {"bad_quoting": 1}
    assert pd.read_parquet(tmp_path / "urls.parquet")["caption"].tolist() == ["fine", "quoted, with a comma"]


def test_other_schemes_only_when_allowed(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text("a\tfile:///tmp/a.jpg\nb\thttp://example.invalid/b.jpg\n")
    allowed = url_list.normalize(path, tmp_path / "urls.parquet", ("caption", "url"), "url", "caption",
                                 schemes=("http", "https", "file"))
    assert allowed.rows == 2


def test_swapped_columns_are_named_as_the_problem(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text(CC12M_ROWS)  # url<TAB>caption, read as cc3m (caption<TAB>url)
    with pytest.raises(SystemExit, match="columns look swapped"):
        url_list.normalize(path, tmp_path / "urls.parquet", SOURCES["cc3m"].headerless_columns, "url", "caption")


def test_a_quoted_caption_may_hold_newlines(tmp_path):
    """RFC 4180: a quoted field may span lines; the rows after it keep their own line numbers."""
    path = tmp_path / "list.csv"
    path.write_text('url,caption\nhttp://example.invalid/a.jpg,"two\n\nlines"\nhttp://example.invalid/b.jpg,"x\n'
                    'http://example.invalid/c.jpg,fine\nhttp://example.invalid/d.jpg,one,too many\n')
    rejections = tmp_path / "rejected.jsonl"
    summary = url_list.normalize(path, tmp_path / "urls.parquet", ("url", "caption"), "url", "caption",
                                 rejections_file=rejections)
    frame = pd.read_parquet(tmp_path / "urls.parquet")
    assert frame["caption"].tolist() == ["two\n\nlines", "fine"]
    assert [json.loads(line)["key"] for line in rejections.read_text().splitlines()] == ["line 5", "line 7"]
    assert dict(summary.rejected) == {"bad_quoting": 1, "wrong_column_count": 1}


def test_repeated_urls_are_fetched_once(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text("".join(f"caption {i}\thttp://example.invalid/{i % 3}.jpg\n" for i in range(10)))
    rejections = tmp_path / "rejected.jsonl"
    summary = url_list.normalize(path, tmp_path / "urls.parquet", ("caption", "url"), "url", "caption",
                                 rejections_file=rejections)
    frame = pd.read_parquet(tmp_path / "urls.parquet")
    assert frame["caption"].tolist() == ["caption 0", "caption 1", "caption 2"] and summary.rows == 3
    assert dict(summary.rejected) == {"duplicate_url": 7}  # not "mostly unusable": the list itself is fine
    logged = [json.loads(line) for line in rejections.read_text().splitlines()]
    assert logged[0]["detail"] == "list.tsv line 4: the same url as line 1" and len(logged) == 7


def test_a_first_row_with_an_empty_url_is_data_not_a_header(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text("no url yet\t\n" + "".join(f"caption {i}\thttp://example.invalid/{i}.jpg\n" for i in range(3)))
    summary = url_list.normalize(path, tmp_path / "urls.parquet", SOURCES["cc3m"].headerless_columns, "url",
                                 "caption")
    assert summary.rows == 3 and dict(summary.rejected) == {"missing_url": 1}


def test_a_folder_is_named_as_such(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cc3m.tsv").write_text("")
    with pytest.raises(SystemExit, match=r"url list '.*lists' is a folder; pass the url list file itself .*cc3m.tsv"):
        normalized(tmp_path, tmp_path / "lists")
