"""`make gpu-kit`: everything a bare, offline GPU machine lacks, in parts that each travel with one command.

The GPU machines have Python 3.12 and PyTorch but no DALI, webdataset, open_clip, ftfy or zstandard, no
package index and no img2dataset, and each command brings at most 64 MiB of files. This downloads the wheels
of tools/gpu/wheels.txt for CPython 3.12 on x86-64, builds the tests' two demo sets here (the GPU machine
cannot download them; their raw download and served files are left out: the GPU check runs no test that
reads those), packs both into one archive (xz only where that saves a part) and cuts it into parts of at most
60 MiB, with a manifest of sha256 for every wheel, part and the archive. It ends by printing the commands
to send, in order (also written to .gpu-kit/COMMANDS.txt).

    python -m tools.gpu.kit                 # into .gpu-kit/ (git-ignored)
"""

import argparse
import json
import lzma
import math
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tqdm import tqdm

from tools.gpu.parts import MANIFEST_NAME, sha256_file

KIT_DIR = Path(".gpu-kit")
WHEELS_FILE = Path(__file__).with_name("wheels.txt")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")
XZ_SAVING = 0.9  # at best about what xz saves on these wheels (they are zip files): tried only where it may pay
CHECK_TIMEOUT_S = 540


def read_pins(path):
    """['name==version', ...] from a requirements-style file (comments and blank lines skipped)."""
    pins = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    pins = [pin for pin in pins if pin]
    unpinned = [pin for pin in pins if "==" not in pin]
    if unpinned:
        raise SystemExit(f"error: {path}: pin every wheel with name==version ({', '.join(unpinned)})")
    return pins


def normalized(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def download_wheels(pins, wheels_dir, python_version, pip_args=()):
    """pip download of exactly these pins (no dependencies: the list names each) for CPython `python_version`."""
    wheels_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
               *(option for platform in PLATFORMS for option in ("--platform", platform)),
               "-d", str(wheels_dir), *pip_args, *pins]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"error: pip could not download the kit's wheels for Python {python_version}:\n"
                         f"{completed.stderr.strip()}\nfix the pin in {WHEELS_FILE} or the network, then run again")
    wheels = sorted(wheels_dir.glob("*.whl"))
    names = {normalized(wheel.name.split("-")[0]) for wheel in wheels}
    absent = [pin for pin in pins if normalized(pin.split("==")[0]) not in names]
    if absent:
        raise SystemExit(f"error: pip saved no wheel for {', '.join(absent)} (Python {python_version})")
    return wheels


def build_demo_sets(demo_dir):
    """The tests' demo sets, built here as the tests build them, less what the GPU check never reads."""
    import demo.end_to_end

    built = []
    for pairs, samples_per_shard in demo.end_to_end.TEST_SETS.values():
        root = demo_dir / demo.end_to_end.folder_name(pairs, samples_per_shard)
        demo.end_to_end.build(root, pairs, samples_per_shard)
        shutil.rmtree(root / "raw")
        shutil.rmtree(root / "source" / "www")
        built.append(dict(folder=root.name, pairs=pairs, samples_per_shard=samples_per_shard,
                          train_samples=json.loads((root / "train" / "manifest.json").read_text())["totals"]
                          ["samples"]))
    return built


def pack(stage_dir, kit_dir, part_bytes):
    """One archive of `stage_dir`: a plain tar, or tar.xz where compressing saves at least one part."""
    archive = kit_dir / "kit.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(stage_dir, arcname=".")
    plain_bytes = archive.stat().st_size
    if math.ceil(plain_bytes * XZ_SAVING / part_bytes) < math.ceil(plain_bytes / part_bytes):
        compressed = kit_dir / "kit.tar.xz"
        with open(archive, "rb") as source, lzma.open(compressed, "wb", preset=6) as sink:
            for chunk in tqdm(iter(lambda: source.read(1 << 22), b""), total=math.ceil(plain_bytes / (1 << 22)),
                              desc="xz", unit="4MiB"):
                sink.write(chunk)
        if math.ceil(compressed.stat().st_size / part_bytes) < math.ceil(plain_bytes / part_bytes):
            archive.unlink()
            return compressed, "xz"
        compressed.unlink()
    return archive, "none"


def split(archive, part_bytes):
    """archive -> [part-1-of-N, ...] beside it, each at most part_bytes; the archive is removed."""
    count = max(1, math.ceil(archive.stat().st_size / part_bytes))
    parts = []
    with open(archive, "rb") as source:
        for number in range(1, count + 1):
            part = archive.with_name(f"part-{number}-of-{count}")
            with open(part, "wb") as sink:
                sink.write(source.read(part_bytes))
            parts.append(part)
    archive.unlink()
    return parts


def git_commit():
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    return dict(commit=git("rev-parse", "HEAD") or None, uncommitted_changes=bool(git("status", "--porcelain")))


def commands(kit_dir, manifest):
    """The device calls to make, in order: one per part, then the check."""
    manifest_path = f"{kit_dir}/{MANIFEST_NAME}"
    lines = []
    for part in manifest["parts"]:
        path = f"{kit_dir}/{part['name']}"
        lines.append(f'run  carry=["{path}", "{manifest_path}"]  command: python3 -m tools.gpu.receive {path}')
    lines.append(f'run  carry=["{manifest_path}"]  timeout_s={CHECK_TIMEOUT_S}  command: make gpu-check OUT_DIR="$OUT"')
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=KIT_DIR)
    parser.add_argument("--wheels", type=Path, default=WHEELS_FILE, help="pins, one name==version a line")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--part-mib", type=float, default=60.0, help="largest part (with the tree, under 64 MiB)")
    parser.add_argument("--no-demo", action="store_true", help="wheels only (the check then has no data to train on)")
    parser.add_argument("--pip-arg", action="append", default=[], help="passed to pip download (e.g. --find-links=DIR)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    part_bytes = int(args.part_mib * (1 << 20))
    kit_dir = args.out
    shutil.rmtree(kit_dir, ignore_errors=True)  # a kit is made whole or not at all: no part of an older one stays
    stage_dir = kit_dir / "stage"
    wheels = download_wheels(read_pins(args.wheels), stage_dir / "wheels", args.python_version, args.pip_arg)
    demo_sets = [] if args.no_demo else build_demo_sets(stage_dir / "demo")
    wheel_entries = [dict(file=wheel.name, bytes=wheel.stat().st_size, sha256=sha256_file(wheel)) for wheel in wheels]
    archive, compression = pack(stage_dir, kit_dir, part_bytes)
    shutil.rmtree(stage_dir)
    archive_entry = dict(name=archive.name, bytes=archive.stat().st_size, sha256=sha256_file(archive),
                         compression=compression)
    parts = split(archive, part_bytes)
    manifest = dict(made_with=git_commit(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    python_version=args.python_version, wheels=wheel_entries, demo_sets=demo_sets,
                    archive=archive_entry,
                    parts=[dict(name=part.name, bytes=part.stat().st_size, sha256=sha256_file(part)) for part in parts])
    (kit_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    lines = commands(kit_dir, manifest)
    (kit_dir / "COMMANDS.txt").write_text("\n".join(lines) + "\n")
    print("Send these to the GPU machine one after another, each as soon as the last returns (it stays started "
          "about 30 s after a command):")
    for line in lines:
        print("  " + line)
    print(f"gpu kit: {len(wheels)} wheels and {len(demo_sets)} demo sets in {len(parts)} parts of at most "
          f"{args.part_mib:g} MiB ({archive_entry['bytes'] / 2**20:.0f} MiB, compression {compression}) in "
          f"{kit_dir}/ in {time.perf_counter() - started:.0f} s; manifest {kit_dir / MANIFEST_NAME}")


if __name__ == "__main__":
    main()
