"""Reading and writing WebDataset tar shards: deterministic tars, DALI indexes, .tar.zst streams."""

import functools
import hashlib
import io
import os
import tarfile
from pathlib import Path

import webdataset as wds
import zstandard

# DALI's own index writer (nvidia-dali ships it as the `wds2idx` tool and module).
from wds2idx import IndexCreator
from webdataset.tariterators import group_by_keys, tar_file_expander


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


def read_samples(urls, handler=wds.reraise_exception):
    """Raw samples (dicts of bytes with '__key__' and '__url__') from .tar or .tar.zst shards."""
    return wds.DataPipeline(
        wds.SimpleShardList([str(url) for url in urls]),
        _open_shards,
        functools.partial(tar_file_expander, handler=handler),
        functools.partial(group_by_keys, handler=handler),
    )
