"""`python -m unsloth_ext env`: what this install can do on this machine."""

from __future__ import annotations

import ctypes
import platform
import subprocess
from importlib import metadata

import torch

import unsloth_ext
from unsloth_ext._extension import STATE, arch_supported, built_archs, op_disabled
from unsloth_ext.ops import KERNEL_OPS


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return "no NVIDIA driver found"


def _op_status(op: str, capability: tuple[int, int] | None) -> str:
    if not STATE.loaded:
        return "reference (extension not loaded)"
    if op_disabled(op):
        return "reference (UNSLOTH_EXT_DISABLE)"
    if capability is None:
        return "reference (no GPU)"
    if not arch_supported(capability):
        return f"reference (sm_{capability[0]}{capability[1]} not in the binary)"
    return "kernel"


def report() -> tuple[str, int]:
    """The report text, and the exit code: non-zero only when the install is broken."""
    lines = [
        f"unsloth_ext  {unsloth_ext.__version__}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"driver       {_driver_version()}",
    ]
    capability = None
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            capability = capability or cap
            lines.append(f"gpu {i}        {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("gpu          none")
    if STATE.loaded:
        meta = STATE.metadata
        lines.append(f"extension    loaded; archs {', '.join(built_archs())}; built against torch "
                     f"{meta.get('torch_version')} / CUDA {meta.get('cuda_version')}; git "
                     f"{str(meta.get('git_sha'))[:12]}")
    else:
        lines.append(f"extension    not loaded: {STATE.reason}")
    lines.append("ops (first GPU):")
    for op in KERNEL_OPS:
        lines.append(f"  {op:<20} {_op_status(op, capability)}")
    for package in ("transformers", "peft", "bitsandbytes"):
        lines.append(f"{package:<12} {_version(package)}")
    return "\n".join(lines), 1 if STATE.broken else 0
