"""The GPU kit: parts that reassemble to the recorded wheels, an offline install, and every stage of the GPU
check run here on the CPU at tiny sizes (so a GPU run fails only on what needs a GPU)."""

import json
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from demo.end_to_end import TEST_SETS, folder_name
from tools.gpu import check, kit, parts


def write_wheel(folder, name, version):
    """A minimal pure-Python wheel of a package `name` whose VERSION is `version`."""
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{name}/data.bin",
                                                                       f"{dist_info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
        # incompressible bytes, enough for several parts
        wheel.writestr(f"{name}/data.bin", random.Random(name).randbytes(12_000))
    return path


@pytest.fixture
def tiny_kit(tmp_path, capsys):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheels = [write_wheel(wheelhouse, "kitprobe_one", "1.0"), write_wheel(wheelhouse, "kitprobe_two", "2.5")]
    pins = tmp_path / "wheels.txt"
    pins.write_text("# test pins\nkitprobe_one==1.0\nkitprobe_two==2.5  # the second\n")
    kit_dir = tmp_path / "kit"
    kit.main(["--out", str(kit_dir), "--wheels", str(pins), "--python-version", "3.11", "--part-mib", "0.004",
              "--no-demo", "--pip-arg=--no-index", f"--pip-arg=--find-links={wheelhouse}"])
    return kit_dir, wheels, capsys.readouterr().out


def test_kit_parts_reassemble_to_the_recorded_wheels_and_install_offline(tiny_kit, tmp_path):
    kit_dir, wheels, printed = tiny_kit
    manifest = parts.load_manifest(kit_dir / parts.MANIFEST_NAME)
    assert len(manifest["parts"]) >= 3
    assert all(part["bytes"] <= 0.004 * 2**20 for part in manifest["parts"])
    assert {wheel["file"]: wheel["sha256"] for wheel in manifest["wheels"]} == \
        {wheel.name: parts.sha256_file(wheel) for wheel in wheels}
    # the printed sequence: one receive per part, in order, then the check
    sends = [line for line in printed.splitlines() if "tools.gpu.receive" in line]
    assert [line.split()[-1].split("/")[-1] for line in sends] == [part["name"] for part in manifest["parts"]]
    assert "make gpu-check" in printed.splitlines()[len(sends) + 1]

    received = tmp_path / "received"
    for number, part in enumerate(manifest["parts"], start=1):
        missing = parts.receive(kit_dir / part["name"], manifest, received)
        assert missing == [entry["name"] for entry in manifest["parts"][number:]]
    unpacked = parts.assemble(manifest, received, tmp_path / "unpacked")
    for wheel in wheels:
        assert parts.sha256_file(unpacked / "wheels" / wheel.name) == parts.sha256_file(wheel)
    site = parts.install(manifest, unpacked, tmp_path / "site")
    imported = subprocess.run([sys.executable, "-c", "import kitprobe_one, kitprobe_two; "
                               "print(kitprobe_one.VERSION, kitprobe_two.VERSION)"],
                              capture_output=True, text=True, env={"PYTHONPATH": str(site)})
    assert imported.stdout.split() == ["1.0", "2.5"], imported.stderr


def test_a_damaged_or_missing_part_is_named(tiny_kit, tmp_path):
    kit_dir, _, _ = tiny_kit
    manifest = parts.load_manifest(kit_dir / parts.MANIFEST_NAME)
    first, second = (kit_dir / part["name"] for part in manifest["parts"][:2])
    parts.receive(first, manifest, tmp_path / "received")
    with pytest.raises(parts.KitError, match=f"parts not received yet: {second.name}"):
        parts.assemble(manifest, tmp_path / "received", tmp_path / "unpacked")
    second.write_bytes(b"x" + second.read_bytes()[1:])
    with pytest.raises(parts.KitError, match=f"{second.name} does not match its sha256"):
        parts.receive(second, manifest, tmp_path / "received")


def test_a_pin_without_a_version_is_refused(tmp_path):
    pins = tmp_path / "wheels.txt"
    pins.write_text("webdataset\n")
    with pytest.raises(SystemExit, match="pin every wheel with name==version"):
        kit.read_pins(pins)


def test_the_kit_pins_the_versions_this_project_installs():
    """The GPU machine must run what CI runs: every pin is the version installed here."""
    from importlib import metadata

    for pin in kit.read_pins(kit.WHEELS_FILE):
        name, version = pin.split("==")
        assert metadata.version(name) == version, pin


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_stops_at_once_with_what_it_needs(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "tools.gpu.check", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "needs an NVIDIA GPU with a CUDA driver" in completed.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_every_gpu_check_stage_runs_on_the_cpu_at_tiny_sizes(demo_shards, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for pairs, samples_per_shard in TEST_SETS.values():  # the small set stands in for both
        (data / folder_name(pairs, samples_per_shard)).symlink_to(demo_shards["root"])
    out = tmp_path / "out"
    assert check.main(["--tiny", "--data", str(data), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == [stage.name for stage in check.stages("python", data, tmp_path, tiny=True)]
    assert {name: entry["status"] for name, entry in results["stages"].items()} == \
        dict.fromkeys(results["stages"], "ok")
    assert results["stages"]["train"]["figures"]["steps"] == 3
    assert 0 <= results["stages"]["train"]["figures"]["data_wait_fraction"] <= 1
    assert "zeroshot" in results["stages"]["zeroshot"]["figures"]
    assert results["stages"]["bench_data"]["figures"]["dali_cpu_samples_per_s"] > 0
    assert results["stages"]["bench_step_compiled"]["figures"]["compile"] == "eager"
    profiled = results["stages"]["profile"]["figures"]["presets"]
    assert list(profiled) == list(check.TINY_PROFILED_PRESETS)
    assert all(0 <= summary["device_idle_fraction"] <= 1 for summary in profiled.values())
    assert results["environment"]["device"] == "cpu"
    report = (out / "gpu-benchmarks.md").read_text()
    assert "| DALI GPU multi-crop" in report and "| bench_step | ok |" in report
    for name in ("check.log", "datapipe.png", "step.png", "train-losses.png", "profile-harmony_demo.trace.json.gz"):
        assert (out / name).is_file(), name


def test_a_stage_that_overruns_is_stopped_and_recorded(tmp_path):
    stage = check.Stage("sleeper", 1, [sys.executable, "-c", "import time; print('started', flush=True); "
                                                            "time.sleep(60)"])
    with open(tmp_path / "log", "w") as log:
        status, seconds, output = check.run_stage(stage, None, log)
    assert status == "overran its 1 s budget" and seconds < 30 and "started" in output
