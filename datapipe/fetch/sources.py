"""Dataset presets: where a url list comes from, its columns, and the img2dataset options it is fetched with.

The options are img2dataset's own names; they are defaults that `make download DOWNLOAD_ARGS=...`
overrides. Resize policy: images whose shorter side exceeds `image_size` are downscaled to it
(keep_ratio, area interpolation) and re-encoded as JPEG at `encode_quality`; smaller JPEGs are
stored byte for byte (`skip_reencode`), so `make shards` sees the original bytes, EXIF orientation
included, and judges them itself. 384 px keeps enough pixels for the 224-px global crops at scale
0.32-1.0 (a crop of 32% of a 384-px image is about 217 px wide).
"""

from dataclasses import dataclass, field

DOWNLOAD_OPTIONS = dict(
    image_size=384, resize_mode="keep_ratio", resize_only_if_bigger=True, skip_reencode=True, encode_format="jpg",
    encode_quality=95, number_sample_per_shard=10000, retries=2, timeout=10, incremental_mode="incremental",
    enable_wandb=False)


@dataclass(frozen=True)
class Source:
    name: str
    # Columns of a headerless TSV, in file order; a file with a header names its own.
    headerless_columns: tuple = ("url", "caption")
    url_column: str = "url"
    caption_column: str = "caption"
    download_options: dict = field(default_factory=lambda: dict(DOWNLOAD_OPTIONS))  # img2dataset's names
    homepage: str = ""


SOURCES = {
    "demo": Source(
        name="demo", headerless_columns=("caption", "url"),
        download_options={**DOWNLOAD_OPTIONS, "image_size": 256, "number_sample_per_shard": 1000, "retries": 0,
                          "timeout": 5},
        homepage="python -m demo.download, which generates it and serves it on 127.0.0.1"),
    # Conceptual Captions 3M: Train_GCC-training.tsv, no header, caption<TAB>url.
    "cc3m": Source(
        name="cc3m", headerless_columns=("caption", "url"),
        homepage="https://ai.google.com/research/ConceptualCaptions/download"),
    # Conceptual 12M: cc12m.tsv, no header, url<TAB>caption.
    "cc12m": Source(
        name="cc12m", headerless_columns=("url", "caption"),
        homepage="https://github.com/google-research-datasets/conceptual-12m"),
    # Any url list with named columns (csv/tsv with a header, parquet), or a headerless
    # url<TAB>caption TSV; columns can be renamed with --url-col / --caption-col.
    "custom": Source(name="custom"),
}


def get_source(name):
    try:
        return SOURCES[name]
    except KeyError:
        raise SystemExit(f"error: unknown dataset '{name}'; choose one of: {', '.join(SOURCES)}") from None
