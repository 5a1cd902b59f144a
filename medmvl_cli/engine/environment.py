"""What this machine has: package versions, devices, dtype support."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Iterable


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def bf16_is_fast() -> bool:
    """bfloat16 is worth training in only on CUDA GPUs that support it natively (Ampere and newer)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def describe_environment(packages: Iterable[str]) -> dict:
    import torch

    from medmvl_cli.threads import current as current_threads

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_gib": props.total_memory / 2**30})
    versions = {"python": platform.python_version()}
    versions.update({name: package_version(name) for name in packages})
    return {
        "versions": versions,
        "cpu_threads": torch.get_num_threads(),
        "thread_policy": current_threads().to_dict(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "bf16_fast": bf16_is_fast(),
    }
