"""What produced a result: bit-identity is promised within one processor, software stack and
device, so every stage's metrics name theirs (`platform`) and the report says which outputs
came from another machine."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from pipeline.checkpoint import device_tag


@functools.cache
def processor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine()


def describe(device: torch.device | str) -> str:
    return f"{processor()}; {platform.system()} {platform.machine()}; torch {torch.__version__}; {device_tag(device)}"
