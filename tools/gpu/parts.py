"""The kit's archive in parts: hashes, receiving one part, putting the archive together, installing its wheels.

Standard library only: on the GPU machine this runs before anything is installed.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MANIFEST_NAME = "manifest.json"
RECEIVED_DIR = Path("/tmp/harmony-gpu-kit")  # where parts wait on the GPU machine, outside the working tree
UNPACKED_DIR = Path("/tmp/harmony-gpu-kit/unpacked")
SITE_DIR = Path("/tmp/harmony-gpu-site")  # pip --target folder; PYTHONPATH puts it before the machine's packages
INSTALLED_MARKER = ".harmony-kit-archive"


class KitError(Exception):
    """Something the kit lacks or holds wrongly: the message says which file and what to do."""


def sha256_file(path, chunk_bytes=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(path):
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path} not found: run `make gpu-kit` here first, and carry {path} with each command")
    return json.loads(path.read_text())


def receive(part_path, manifest, received_dir=RECEIVED_DIR):
    """Check one part against the manifest and keep it in `received_dir`; returns the names still missing."""
    part_path = Path(part_path)
    entry = next((part for part in manifest["parts"] if part["name"] == part_path.name), None)
    if entry is None:
        raise KitError(f"{part_path.name} is not a part of this kit (its manifest lists "
                       f"{', '.join(part['name'] for part in manifest['parts'])}): make gpu-kit made a new kit; "
                       "carry the manifest.json of the same kit")
    if not part_path.is_file():
        raise KitError(f"{part_path} did not arrive: name it in the run's carry list")
    if sha256_file(part_path) != entry["sha256"]:
        raise KitError(f"{part_path} does not match its sha256 in the manifest: send it again")
    received_dir = Path(received_dir)
    received_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part_path, received_dir / part_path.name)
    return missing_parts(manifest, received_dir)


def missing_parts(manifest, received_dir=RECEIVED_DIR):
    """Names of the parts not yet received whole (absent, or not matching their sha256)."""
    missing = []
    for entry in manifest["parts"]:
        path = Path(received_dir) / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            missing.append(entry["name"])
    return missing


def assemble(manifest, received_dir=RECEIVED_DIR, unpacked_dir=UNPACKED_DIR):
    """The parts joined, checked against the archive's sha256 and unpacked; every wheel checked. Returns the
    unpacked folder (wheels/, demo/)."""
    missing = missing_parts(manifest, received_dir)
    if missing:
        raise KitError(f"parts not received yet: {', '.join(missing)}; send each with "
                       "`python3 -m tools.gpu.receive .gpu-kit/<part>` (make gpu-kit printed the commands)")
    archive = Path(received_dir) / manifest["archive"]["name"]
    with open(archive, "wb") as joined:
        for entry in manifest["parts"]:
            with open(Path(received_dir) / entry["name"], "rb") as part:
                shutil.copyfileobj(part, joined, 1 << 22)
    if sha256_file(archive) != manifest["archive"]["sha256"]:
        raise KitError(f"{archive}: the joined parts do not match the archive's sha256; send the parts again")
    unpacked_dir = Path(unpacked_dir)
    shutil.rmtree(unpacked_dir, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked_dir, filter="data")
    archive.unlink()
    for wheel in manifest["wheels"]:
        path = unpacked_dir / "wheels" / wheel["file"]
        if not path.is_file() or sha256_file(path) != wheel["sha256"]:
            raise KitError(f"{path} is missing or does not match its sha256 in the manifest: run make gpu-kit again")
    return unpacked_dir


def install(manifest, unpacked_dir=UNPACKED_DIR, site_dir=SITE_DIR, python=sys.executable):
    """pip-install the kit's wheels into `site_dir` without an index and without their dependencies (the kit
    lists every one). Skipped when `site_dir` already holds this archive's wheels."""
    site_dir = Path(site_dir)
    marker = site_dir / INSTALLED_MARKER
    if marker.is_file() and marker.read_text() == manifest["archive"]["sha256"]:
        return site_dir
    shutil.rmtree(site_dir, ignore_errors=True)
    wheels = [str(Path(unpacked_dir) / "wheels" / wheel["file"]) for wheel in manifest["wheels"]]
    command = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(site_dir), *wheels]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        raise KitError(f"pip could not install the kit's wheels into {site_dir}:\n{completed.stderr.strip()}")
    marker.write_text(manifest["archive"]["sha256"])
    return site_dir
