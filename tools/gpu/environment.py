"""The machine and the versions a GPU check actually ran with, as JSON on stdout.

    python -m tools.gpu.environment
"""

import json
import os
import platform
import subprocess
from importlib import metadata

PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda130", "timm", "open_clip_torch", "webdataset", "numpy",
            "pillow", "ftfy")


def driver_version():
    try:
        completed = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() or None


def environment():
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    return dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
                device=torch.cuda.get_device_name() if cuda else "cpu", driver=driver_version() if cuda else None,
                cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
                gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else None,
                versions=versions)


if __name__ == "__main__":
    print(json.dumps(environment()))
