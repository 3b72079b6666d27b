"""The stamp every benchmark result carries: device name, library versions, date."""
from __future__ import annotations

import datetime
import os
import platform

import torch

from .._version import __version__

__all__ = ["environment_stamp", "device_slug"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    proc = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {proc} ({os.cpu_count()} cores, {threads} thread{'s' if threads != 1 else ''})"


def environment_stamp(device: torch.device | str = "cpu") -> dict:
    """Device name and versions of everything that decides a timing, as a JSON-serialisable dict."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing (macOS, Windows): the stamp says so
        triton_version = None
    stamp = {
        "device": _device_name(device),
        "device_type": device.type,
        "sparsekernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        stamp["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return stamp


def device_slug(device: torch.device | str = "cpu") -> str:
    """A folder-safe name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")
