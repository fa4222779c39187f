"""Reading and writing WebDataset tar shards: deterministic tars, DALI indexes, .tar.zst streams."""

import dataclasses
import functools
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path, PurePosixPath

import webdataset as wds
import zstandard

# DALI's own index writer (nvidia-dali ships it as the `wds2idx` tool and module).
from wds2idx import IndexCreator
from webdataset.tariterators import group_by_keys, tar_file_expander

METADATA_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, never part of a sample


@dataclasses.dataclass(frozen=True)
class RefusedMember:
    """What read_samples gives, instead of its bytes, for a member it refused to read from its header alone."""

    reason: str  # a short stable code: unsafe_member_name, sparse_member or member_too_large
    detail: str


def member_info(name, size):
    """A tar header that does not depend on who wrote the file or when."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uname = info.gname = ""
    return info


def write_tar(path, samples):
    """Write samples (dicts: '__key__' plus extension -> bytes) to `path` atomically.

    Members are written in sample order, extensions sorted, so equal input gives equal bytes.
    A `.zst` path is compressed with zstandard. Returns the final path.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as raw_file:
        sink = zstandard.ZstdCompressor(level=10).stream_writer(raw_file) if path.suffix == ".zst" else raw_file
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as archive:
            for sample in samples:
                key = sample["__key__"]
                for extension in sorted(name for name in sample if not name.startswith("__")):
                    data = sample[extension]
                    archive.addfile(member_info(f"{key}.{extension}", len(data)), io.BytesIO(data))
        if sink is not raw_file:
            sink.flush(zstandard.FLUSH_FRAME)
    os.replace(partial, path)
    return path


def write_dali_index(tar_path, index_path):
    """DALI's index (format v1.2) for one uncompressed tar, written atomically."""
    partial = Path(str(index_path) + ".partial")
    with IndexCreator(str(tar_path), str(partial), verbose=False) as creator:
        creator.create_index()
    os.replace(partial, index_path)


def read_dali_index(index_path):
    """[(key, {extension: (offset, size)})] from a v1.2 DALI index."""
    lines = Path(index_path).read_text().splitlines()
    version, count = lines[0].split()
    if version != "v1.2" or int(count) != len(lines) - 1:
        raise ValueError(f"{index_path}: header '{lines[0]}' does not match {len(lines) - 1} entries")
    entries = []
    for line in lines[1:]:
        fields = line.split()
        components = {}
        key = None
        for extension, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
            components[extension] = (int(offset), int(size))
            key = name[: -len(extension) - 1]
        entries.append((key, components))
    return entries


def member_offsets(tar_path):
    """{member name: (data offset, size)} of a plain tar's regular files, the same figures DALI indexes."""
    with tarfile.open(tar_path) as archive:
        return {member.name: (member.offset_data, member.size) for member in archive if member.isreg()}


def sha256_file(path, chunk_bytes=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def open_shard(url):
    """A byte stream of the uncompressed tar; `.tar.zst` shards are decompressed on the fly."""
    stream = wds.gopen(url)
    if str(url).endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(stream, closefd=True)
    return stream


def _open_shards(sources):
    for source in sources:
        yield dict(url=source["url"], stream=open_shard(source["url"]))


def climbs_out(name):
    """Whether a member name is absolute or has a '..' part: a path outside the folder it is extracted to."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts


def member_refusal(member, max_member_bytes):
    """A RefusedMember for a tar member that must not be read (decided from its header alone), else None."""
    if climbs_out(member.name):
        return RefusedMember("unsafe_member_name", f"member name {member.name!r} is absolute or climbs out of its "
                                                   "folder with '..'")
    if member.issparse():
        return RefusedMember("sparse_member", f"{member.name} is a sparse file declaring {member.size} bytes; "
                                              "img2dataset never writes one")
    if member.size > max_member_bytes:
        return RefusedMember("member_too_large", f"{member.name} declares {member.size} bytes, over the limit of "
                                                 f"{max_member_bytes} (--max-member-bytes)")
    return None


def _screened_members(sources, max_member_bytes):
    """{fname, data, __url__} of each regular member; `data` is a RefusedMember for one member_refusal refuses,
    whose bytes are skipped, never read into memory."""
    for source in sources:
        with tarfile.open(fileobj=source["stream"], mode="r|*") as archive:
            for member in archive:
                if member.isreg() and not METADATA_MEMBER.match(member.name):
                    refusal = member_refusal(member, max_member_bytes)
                    data = refusal or archive.extractfile(member).read()
                    yield dict(fname=member.name, data=data, __url__=source["url"])
                archive.members = []  # a stream: keep no headers


def read_samples(urls, handler=wds.reraise_exception, max_member_bytes=None):
    """Raw samples (dicts of bytes with '__key__' and '__url__') from .tar or .tar.zst shards.

    With `max_member_bytes`, a member is judged by its tar header before it is read: one with an absolute or
    '..' name, a sparse one, or one larger than that is not read, and its sample holds a RefusedMember for it."""
    expand = (functools.partial(tar_file_expander, handler=handler) if max_member_bytes is None
              else functools.partial(_screened_members, max_member_bytes=max_member_bytes))
    return wds.DataPipeline(
        wds.SimpleShardList([str(url) for url in urls]),
        _open_shards,
        expand,
        functools.partial(group_by_keys, handler=handler),
    )
