"""Loading the compiled extension, and deciding per call whether a kernel may run.

The binary is loaded only when the build metadata written beside it matches the running torch;
otherwise (and without a GPU) every op runs its PyTorch reference, after one notice.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
METADATA_FILE = PACKAGE_DIR / "_C_build.json"


class UnslothExtWarning(UserWarning):
    """Notices about the extension: not built, built for another torch, GPU not covered."""


@dataclass
class ExtensionState:
    loaded: bool = False
    reason: str = ""  # why it is not loaded, for the notice and the environment report
    broken: bool = False  # a binary is present but could not be used: the install is broken
    metadata: dict = field(default_factory=dict)


def _binary_present() -> bool:
    return any(PACKAGE_DIR.glob("_C.*.so")) or any(PACKAGE_DIR.glob("_C.*.pyd"))


def _load() -> ExtensionState:
    if not _binary_present():
        return ExtensionState(reason="the CUDA extension is not built (pure-Python install)")
    try:
        meta = json.loads(METADATA_FILE.read_text())
    except (OSError, ValueError) as exc:
        return ExtensionState(reason=f"the extension's build metadata is unreadable ({exc})",
                              broken=True)
    if meta.get("torch_version") != torch.__version__:
        return ExtensionState(
            reason=(f"the extension was built for torch {meta.get('torch_version')} but torch "
                    f"{torch.__version__} is running; rebuild with "
                    "`pip install --no-build-isolation -e .`"),
            metadata=meta)
    try:
        importlib.import_module("unsloth_ext._C")
    except (ImportError, OSError) as exc:
        return ExtensionState(reason=f"the extension failed to load: {exc}", broken=True,
                              metadata=meta)
    return ExtensionState(loaded=True, metadata=meta)


STATE = _load()


def built_archs() -> list[str]:
    """Archs in the binary, as in TORCH_CUDA_ARCH_LIST ("8.0", "9.0+PTX")."""
    return list(STATE.metadata.get("archs", []))


_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def arch_supported(capability: tuple[int, int]) -> bool:
    """True when the binary has SASS this GPU runs (same major, minor not above; an
    arch-specific "9.0a" only on that exact arch) or PTX for an arch not above it."""
    for arch in built_archs():
        match = _ARCH.match(arch)
        if match is None:
            continue
        built = (int(match.group(1)), int(match.group(2)))
        specific, ptx = match.group(3) == "a", match.group(4) is not None
        if built == capability:
            return True
        if not specific and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if ptx and not specific and built <= capability:
            return True
    return False


@functools.lru_cache(maxsize=None)
def device_supported(index: int) -> bool:
    """Whether kernels may run on CUDA device `index`; warns once per device when not."""
    capability = torch.cuda.get_device_capability(index)
    ok = arch_supported(capability)
    if not ok:
        name = torch.cuda.get_device_name(index)
        warnings.warn(
            f"unsloth_ext: {name} (sm_{capability[0]}{capability[1]}) is not covered by the "
            f"extension's archs {built_archs()}; its ops run through the PyTorch reference. "
            "Rebuild with TORCH_CUDA_ARCH_LIST including this GPU.",
            UnslothExtWarning, stacklevel=3)
    return ok


@functools.lru_cache(maxsize=8)
def _disabled_set(value: str) -> frozenset[str]:
    return frozenset(v.strip() for v in value.split(",") if v.strip())


def op_disabled(op: str) -> bool:
    """UNSLOTH_EXT_DISABLE=op,op or =all forces the reference path (read at every call)."""
    disabled = _disabled_set(os.environ.get("UNSLOTH_EXT_DISABLE", ""))
    return op in disabled or "all" in disabled


def use_kernel(op: str, tensor: torch.Tensor) -> bool:
    """Whether `op` runs its CUDA kernel for inputs on `tensor`'s device."""
    if not STATE.loaded or not tensor.is_cuda or op_disabled(op):
        return False
    return device_supported(tensor.device.index if tensor.device.index is not None
                            else torch.cuda.current_device())


def startup_notice() -> str | None:
    """The one notice printed at import when kernels cannot run here, or None."""
    if not STATE.loaded:
        return f"unsloth_ext: {STATE.reason}; ops run through their PyTorch reference."
    if not torch.cuda.is_available():
        return "unsloth_ext: no CUDA device; ops run through their PyTorch reference."
    return None
