import pandas as pd
import pytest
import zstandard

from datapipe import url_list
from datapipe.sources import SOURCES

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
    ("a\tb\thttp://example.invalid/a.jpg\n", "expects 2"),
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
