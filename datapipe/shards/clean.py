"""Pass 1: one raw shard -> its cleaned samples and one record per sample (datapipe/shards/work.py), in parallel.

Every image is decoded and normalized to an RGB JPEG (datapipe/common/validate.py), every caption cleaned and tokenized,
or the sample is rejected with a reason. Only the images that had to be converted are stored in the work tar: an
RGB JPEG is read again from the raw tar when its training shard is written (pass 3).
"""

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from datapipe.common import captions, manifest, shard_io
from datapipe.common.validate import Rejected, clean_image
from datapipe.shards.inputs import BuildError
from datapipe.shards.work import raw_fingerprint, rules_fingerprint, work_paths

TOKENIZE_BATCH = 256  # captions tokenized per call: open_clip's per-call overhead is large
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices, and jpeg


class UnreadableShard(Exception):
    """A raw tar that cannot be read to the end; carries only a message, so it crosses processes."""


class UnlistedSamples(Exception):
    """A raw tar whose samples are not those its parquet lists as downloaded; carries only a message."""


def _refuse_members(raw):
    """Raise Rejected for a sample with a member the reader refused from its header (shard_io.RefusedMember)."""
    refused = next((value for value in raw.values() if isinstance(value, shard_io.RefusedMember)), None)
    if refused is not None:
        raise Rejected(refused.reason, refused.detail)


def _source_url(raw):
    """The url img2dataset recorded in the sample's json member ('' when there is none or it was refused)."""
    info = raw.get("json", b"{}")
    return json.loads(info or b"{}").get("url", "") if isinstance(info, bytes) else ""


def _check_listed(raw_tar, keys):
    """Raise UnlistedSamples unless the tar's sample keys are those its parquet lists as downloaded: then the
    build's counts reconcile and `make verify` agrees with it."""
    table = pq.read_table(Path(raw_tar).with_suffix(".parquet"), columns=["key", "status"])
    listed = {key for key, status in zip(*(table.column(name).to_pylist() for name in ("key", "status")),
                                         strict=True) if status == "success"}
    extra, missing = sorted(set(keys) - listed), sorted(listed - set(keys))
    problems = ([f"holds {len(extra)} sample(s) its parquet does not list as downloaded (first: {extra[0]!r})"]
                if extra else []) + ([f"lacks {len(missing)} sample(s) its parquet lists as downloaded (first: "
                                      f"{missing[0]!r})"] if missing else [])
    if problems:
        raise UnlistedSamples(" and ".join(problems))


def _clean_sample(raw, url, rules, hashing):
    """(sample to store, its info, the cleaned image, the raw member holding the image when it is stored as it
    came, else None) for one raw img2dataset sample; raises Rejected."""
    _refuse_members(raw)
    member = next((name for name in IMAGE_MEMBERS if name in raw), None)
    image = clean_image(raw[member] if member else b"", rules, hashing)
    original_caption = raw.get("txt", b"").decode("utf-8", errors="replace")
    caption = captions.clean_caption(original_caption)
    if not caption:
        raise Rejected("empty_caption", f"caption {original_caption!r} is empty after cleaning")
    info = dict(key=raw["__key__"], url=url, caption_original=original_caption,
                width_px=image.width_px, height_px=image.height_px, converted=image.converted)
    stored_as_is = f"{raw['__key__']}.{member}" if not image.converted else None
    return dict(__key__=raw["__key__"], jpg=image.jpeg, txt=caption.encode()), info, image, stored_as_is


def clean_raw_shard(raw_tar, work_dir, rules, need_samples=True, hashing=True):
    """Pass 1 for one raw tar; returns its records path. Earlier work is reused only when it was made from
    the same bytes under the same rules (and, with `need_samples`, its cleaned samples are still there).
    `hashing`: give each record the image's perceptual hash."""
    samples_path, records_path, made_from_path = work_paths(work_dir, Path(raw_tar).stem)
    made_from = {"raw": raw_fingerprint(raw_tar), "rules": rules_fingerprint(rules, hashing)}
    if (made_from_path.exists() and json.loads(made_from_path.read_text()) == made_from and records_path.exists()
            and (samples_path.exists() or not need_samples)):
        return records_path
    made_from_path.unlink(missing_ok=True)  # until the new work is complete
    records = []
    try:  # where each member's bytes are: images stored as they came are read from raw/ again in pass 3
        raw_members = shard_io.member_offsets(raw_tar)
    except (tarfile.TarError, EOFError) as error:
        raise UnreadableShard(f"{type(error).__name__}: {error}") from None

    def tokenized(batch):
        for sample, tokens in zip(batch, captions.tokenize([s["txt"].decode() for s in batch]), strict=True):
            sample["tokens"] = captions.tokens_to_bytes(tokens)
            yield sample

    def cleaned_samples():  # streams, holding at most TOKENIZE_BATCH samples
        batch = []
        try:
            for raw in shard_io.read_samples([raw_tar], max_member_bytes=rules.max_member_bytes):
                key = raw["__key__"]
                url = _source_url(raw)
                try:
                    sample, info, image, stored_as_is = _clean_sample(raw, url, rules, hashing)
                except Rejected as rejection:
                    records.append(dict(key=key, url=url, reason=rejection.reason, detail=rejection.detail))
                    continue
                sample["json"] = json.dumps({**info, "source": Path(raw_tar).name}, ensure_ascii=False).encode()
                record = dict(key=key, url=url, reason=None, digest=image.pixel_digest)
                if hashing:
                    phash, details = image.signature
                    record.update(phash=f"{phash:016x}", details=details.hex())
                if stored_as_is:  # no second copy: pass 3 reads these bytes from the raw tar
                    del sample["jpg"]
                    record["jpg_in_raw"] = raw_members[stored_as_is]
                records.append(record)
                batch.append(sample)
                if len(batch) == TOKENIZE_BATCH:
                    yield from tokenized(batch)
                    batch = []
        except (tarfile.TarError, ValueError) as error:
            raise UnreadableShard(f"{type(error).__name__}: {error.args[0] if error.args else error}") from None
        if batch:
            yield from tokenized(batch)

    shard_io.write_tar(samples_path, cleaned_samples())
    try:
        _check_listed(raw_tar, [record["key"] for record in records])
    except UnlistedSamples:
        samples_path.unlink()
        raise
    records.sort(key=lambda record: record["key"])  # tar order is download-completion order; keys are list order
    manifest.write_atomic(records_path, "".join(json.dumps(r) + "\n" for r in records))
    manifest.write_atomic(made_from_path, json.dumps(made_from))
    return records_path


def unusable_shard(raw_tar, error):
    """The BuildError for a raw tar whose pass 1 raised UnreadableShard or UnlistedSamples."""
    raw_tar = Path(raw_tar)
    if isinstance(error, UnreadableShard):
        return BuildError(f"raw shard '{raw_tar}' cannot be read ({error}). Delete it and {raw_tar.stem}_stats.json, "
                          "then run `make download` again: img2dataset's incremental mode fetches just that shard.")
    return BuildError(f"raw shard '{raw_tar}' {error}: it is not the shard img2dataset wrote, and its counts could not "
                      f"reconcile. Delete it, {raw_tar.stem}.parquet and {raw_tar.stem}_stats.json, then run `make "
                      "download` again: img2dataset's incremental mode fetches just that shard.")


def clean_raw_shards(pool, raw_tars, work_dir, rules, need_samples, hashing):
    """Pass 1 for each of `raw_tars` in parallel on `pool`, with progress; returns their records paths."""
    futures = [pool.submit(clean_raw_shard, raw_tar, work_dir, rules, need_samples, hashing) for raw_tar in raw_tars]
    total = sum(json.loads(raw_tar.with_name(f"{raw_tar.stem}_stats.json").read_text()).get("successes", 0)
                for raw_tar in raw_tars)
    records_paths = []
    with tqdm(total=total, desc="validate" if not need_samples else "clean again", unit="img") as progress:
        for raw_tar, future in zip(raw_tars, futures, strict=True):
            try:
                records_paths.append(future.result())
            except (UnreadableShard, UnlistedSamples) as error:
                raise unusable_shard(raw_tar, error) from None
            progress.update(sum(1 for _ in open(records_paths[-1])))  # noqa: SIM115 (closed when read)
    return records_paths
