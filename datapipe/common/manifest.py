"""What `make shards` writes beside the shards: manifest.json, rejected.jsonl.zst, report.md."""

import json
import os
from pathlib import Path

import zstandard

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl.zst"
REPORT = "report.md"

FIELDS = {
    "jpg": "RGB JPEG (EXIF orientation applied; CMYK, grayscale, palette and alpha converted)",
    "txt": "cleaned caption (ftfy, HTML entities, whitespace), UTF-8",
    "tokens": "77 int32 little-endian CLIP BPE ids: SOT, ids, EOT, zero padding",
    "json": "url, original caption, width/height in px, raw shard, conversions applied",
}


# What each reader needs of a shard entry (name and index are always checked to be plain file names).
LOADER_FIELDS = {"name": str, "samples": int}
REMOTE_FIELDS = {**LOADER_FIELDS, "bytes": int, "sha256": str}
FILE_NAME_FIELDS = ("name", "index")
REBUILD = "rebuild the shards with `make shards` (or re-publish them)"


class ManifestError(ValueError):
    """A manifest that cannot be used as it is; the message names it, the entry and what to do, on one line."""


def is_plain_file_name(name):
    """Whether `name` is one file in the folder it is named in: no folder part, not '.' or '..', not empty."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _entry_problem(entry, fields):
    """What is wrong with one shard entry of a manifest, or None."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    for field in FILE_NAME_FIELDS:
        if field in entry and not is_plain_file_name(entry[field]):
            return (f"{field!r} is {entry[field]!r}: a manifest names files in its own folder, never a path "
                    "(absolute, or with '..' or '/')")
    for field, kind in fields.items():
        value = entry.get(field)
        if value is None:
            return f"has no {field!r}"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{field!r} is {value!r}, not a {kind.__name__}"
    return None


def parse_manifest(data, where, fields=LOADER_FIELDS, sections=()):
    """The manifest dict from its JSON text or bytes, read from `where` (a path or URL, for messages); raises
    ManifestError unless it is an object with a `shards` list of entries holding `fields` (name: type), plain file
    names, and the top-level objects `sections`."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{where} is not JSON ({error}); {REBUILD}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where} is a JSON {type(manifest).__name__}, not an object with a 'shards' list; "
                            f"{REBUILD}")
    if not isinstance(manifest.get("shards"), list):
        raise ManifestError(f"{where} has no 'shards' list; {REBUILD}")
    for number, entry in enumerate(manifest["shards"]):
        problem = _entry_problem(entry, fields)
        if problem:
            raise ManifestError(f"{where}: shards[{number}] {problem}; {REBUILD}")
    for section in sections:
        if not isinstance(manifest.get(section), dict):
            raise ManifestError(f"{where} has no {section!r} object; {REBUILD}")
    return manifest


def read_manifest(path, fields=LOADER_FIELDS, sections=()):
    """parse_manifest of a local manifest file."""
    return parse_manifest(Path(path).read_bytes(), path, fields, sections)


def write_atomic(path, data):
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(partial, path)


def write_rejected(path, rejections):
    """One JSON line per dropped sample (stage, key, url, reason, detail), zstd-compressed, streamed from the
    iterable `rejections` (never all in memory), written atomically."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as raw, zstandard.ZstdCompressor(level=10).stream_writer(raw) as compressed:
        for rejection in rejections:
            compressed.write((json.dumps(rejection, ensure_ascii=False) + "\n").encode())
    os.replace(partial, path)


def read_rejected(path):
    with open(path, "rb") as compressed:
        data = zstandard.ZstdDecompressor().stream_reader(compressed).read()
    return [json.loads(line) for line in data.decode().splitlines()]


def reconciliation(url_list_rows, failed, in_raw, kept, rejected, url_list=None, url_list_rejected=None):
    """Counts that must add up: every row of the url list is usable or set aside, every usable row was given
    to img2dataset, every url is downloaded or failed, every download kept or rejected. `failed`,
    `rejected` and `url_list_rejected` count by reason; `url_list` is what `make download` recorded of the
    list (None for a download made elsewhere)."""
    listed = {}
    if url_list is not None:
        listed = {"url_list": url_list["source"], "url_list_usable_rows": url_list["rows"],
                  "url_list_rejected": dict(sorted((url_list_rejected or {}).items())),
                  "url_list_balanced": url_list["rows"] == url_list_rows
                  and dict(url_list_rejected or {}) == url_list["rejected"]}
    return {**listed,
        "url_list_rows": url_list_rows,
        "download_failed": dict(sorted(failed.items())),
        "in_raw": in_raw,
        "kept": kept,
        "rejected": dict(sorted(rejected.items())),
        "download_balanced": url_list_rows == in_raw + sum(failed.values()),
        "shards_balanced": in_raw == kept + sum(rejected.values()),
    }


def write_report(path, manifest, examples):
    """A human-readable summary: counts, where samples went, and a few rejections per reason."""
    counts = manifest["reconciliation"]
    lines = [
        f"# Shards report: {manifest['name']}",
        "",
        f"Built from `{manifest['source']}` by `python -m datapipe.shards build`.",
        "",
        "| stage | samples |",
        "|---|---|",
        *([f"| rows of the url list set aside (unusable) | {sum(counts['url_list_rejected'].values())} |"]
          if "url_list" in counts else []),
        f"| rows in the url list given to img2dataset | {counts['url_list_rows']} |",
        f"| failed to download | {sum(counts['download_failed'].values())} |",
        f"| downloaded (in raw shards) | {counts['in_raw']} |",
        f"| rejected by `make shards` | {sum(counts['rejected'].values())} |",
        f"| **kept, in {len(manifest['shards'])} training shards** | **{counts['kept']}** |",
        "",
        *([f"Every usable row of `{counts['url_list']}` was given to img2dataset: "
           f"{'yes' if counts['url_list_balanced'] else 'NO'}. "] if "url_list" in counts else []),
        f"Every url is accounted for: {'yes' if counts['download_balanced'] else 'NO'}. "
        f"Every download is kept or rejected: {'yes' if counts['shards_balanced'] else 'NO'}.",
        "",
        "## Dropped, by reason",
        "",
        "| stage | reason | samples | example |",
        "|---|---|---|---|",
    ]
    for stage, reasons in (("url_list", counts.get("url_list_rejected", {})), ("download", counts["download_failed"]),
                           ("shards", counts["rejected"])):
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            example = examples.get((stage, reason), {})
            detail = str(example.get("detail", "")).replace("|", "/")[:80]
            lines.append(f"| {stage} | {reason} | {count} | `{example.get('key', '')}` {detail} |")
    if manifest.get("exclude"):
        lines += ["", "## Evaluation sets excluded (EXCLUDE)", ""]
        for excluded in manifest["exclude"]:
            unreadable = f" ({excluded['unreadable']} could not be read)" if excluded["unreadable"] else ""
            lines.append(f"- `{excluded['path']}`: {excluded['images']} images{unreadable}, "
                         f"{excluded['overlapping_samples']} training samples dropped as `eval_overlap`")
    lines += [
        "",
        f"All dropped samples, one JSON line each: `{REJECTED}`.",
        "",
        "## Rules",
        "",
        *[f"- {name}: {value}" for name, value in manifest["rules"].items()],
        "",
        "## Fields of each sample",
        "",
        *[f"- `.{name}`: {meaning}" for name, meaning in manifest["fields"].items()],
        "",
    ]
    write_atomic(path, "\n".join(lines))
