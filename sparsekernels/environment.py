"""Where a measurement was taken: device names, library versions, the stamp every result carries and the key
the dispatcher files its decisions under. The lowest layer of the package (imports only torch): the dispatcher,
the benchmarks and the reports all use it."""
from __future__ import annotations

import datetime
import functools
import os
import platform

import torch

from ._version import __version__

__all__ = ["environment_stamp", "environment_key", "device_name", "device_slug", "triton_version"]


def device_name(device: torch.device | str = "cpu") -> str:
    """A readable name of ``device``: the GPU's marketing name, or the CPU model with its core and thread counts."""
    device = torch.device(device)
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
    stamp = {
        "device": device_name(device),
        "device_type": device.type,
        "sparsekernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        stamp["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return stamp


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """The installed Triton version, or None (read from the package metadata: Triton is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:  # Triton ships for Linux only
        return None


def environment_key(device: torch.device | str = "cpu") -> str:
    """The key the dispatcher stores decisions under: the device name and the versions that decide a timing.

    Example: ``"NVIDIA H100 80GB HBM3|torch 2.11.0+cu128|triton 3.6.0|sparsekernels 0.1.0"``.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return f"{_cached_device_name(device)}|torch {torch.__version__}|triton {triton_version()}|sparsekernels {__version__}"


@functools.lru_cache(maxsize=None)
def _cached_device_name(device: torch.device) -> str:
    return device_name(device)


def device_slug(device: torch.device | str = "cpu") -> str:
    """A folder-safe name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")
