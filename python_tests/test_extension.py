"""Loading the extension, its metadata checks, dispatch switches, the environment report and the
build script's fallbacks."""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unsloth_ext
from unsloth_ext import _extension
from unsloth_ext.env_report import report

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(unsloth_ext.__file__).resolve().parent


@pytest.mark.parametrize("archs,capability,expected", [
    (["8.0", "9.0+PTX"], (8, 0), True),
    (["8.0", "9.0+PTX"], (8, 6), True),     # sm_80 SASS runs on sm_86
    (["8.0", "9.0+PTX"], (9, 0), True),
    (["8.0", "9.0+PTX"], (10, 0), True),    # PTX JIT-compiled by the driver
    (["8.0", "9.0"], (10, 0), False),
    (["8.6"], (8, 0), False),               # SASS never runs on an older minor
    (["9.0a"], (9, 0), True),
    (["9.0a"], (10, 0), False),             # arch-specific code is not forward compatible
    (["8.0"], (7, 5), False),
])
def test_arch_supported(monkeypatch, archs, capability, expected):
    monkeypatch.setattr(_extension, "built_archs", lambda: archs)
    assert _extension.arch_supported(capability) is expected


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "rms_norm, swiglu")
    assert _extension.op_disabled("rms_norm") and _extension.op_disabled("swiglu")
    assert not _extension.op_disabled("rope")
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "all")
    assert _extension.op_disabled("rope")
    monkeypatch.delenv("UNSLOTH_EXT_DISABLE")
    assert not _extension.op_disabled("rope")


def test_cpu_tensors_use_the_reference():
    assert not _extension.use_kernel("rms_norm", torch.ones(2))


def test_build_metadata_matches_running_torch():
    if not _extension.STATE.loaded:
        pytest.skip("the compiled extension is not loaded")
    meta = json.loads(_extension.METADATA_FILE.read_text())
    assert meta["torch_version"] == torch.__version__
    assert meta["cuda_version"] == torch.version.cuda
    assert meta["archs"] and meta["git_sha"]


def test_environment_report_lists_everything():
    text, code = report()
    assert code == 0
    for needle in ("torch", "driver", "gpu", "extension", "rms_norm", "transformers", "peft",
                   "bitsandbytes"):
        assert needle in text


def test_cli_env_exit_code():
    result = subprocess.run([sys.executable, "-m", "unsloth_ext", "env"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ops (first GPU):" in result.stdout


def _copy_package(tmp_path: Path, with_binary: bool) -> Path:
    """A copy of the installed package in tmp_path, with or without the compiled binary."""
    skip = () if with_binary else ("_C.*", "_C_build.json")
    shutil.copytree(PACKAGE, tmp_path / "unsloth_ext",
                    ignore=shutil.ignore_patterns("__pycache__", *skip))
    return tmp_path


def _run_isolated(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


PROBE = """
import torch, unsloth_ext
from unsloth_ext.env_report import report
x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
y = unsloth_ext.rms_norm(x, w)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
assert torch.allclose(y, ref)
print("loaded", unsloth_ext.STATE.loaded)
print("exit", report()[1])
"""


def test_import_without_binary_falls_back(tmp_path):
    result = _run_isolated(_copy_package(tmp_path, with_binary=False), PROBE)
    assert result.returncode == 0, result.stderr
    assert "loaded False" in result.stdout and "exit 0" in result.stdout
    assert result.stderr.count("UnslothExtWarning") == 1
    assert "not built" in result.stderr


def test_binary_for_another_torch_is_not_loaded(tmp_path):
    if not _extension.STATE.loaded:
        pytest.skip("the compiled extension is not loaded")
    root = _copy_package(tmp_path, with_binary=True)
    meta_file = root / "unsloth_ext" / "_C_build.json"
    meta = json.loads(meta_file.read_text())
    meta["torch_version"] = "1.0.0"
    meta_file.write_text(json.dumps(meta))
    result = _run_isolated(root, PROBE)
    assert result.returncode == 0, result.stderr
    assert "loaded False" in result.stdout and "exit 0" in result.stdout
    assert "built for torch 1.0.0" in result.stderr


def test_corrupt_binary_is_a_broken_install(tmp_path):
    root = _copy_package(tmp_path, with_binary=False)
    binary = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    (root / "unsloth_ext" / binary).write_bytes(b"not an ELF file")
    meta = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "archs": ["9.0"], "git_sha": "x"}
    (root / "unsloth_ext" / "_C_build.json").write_text(json.dumps(meta))
    result = _run_isolated(root, PROBE)
    assert result.returncode == 0, result.stderr   # import and the reference path still work
    assert "loaded False" in result.stdout and "exit 1" in result.stdout
    assert "failed to load" in result.stderr


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("unsloth_ext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_drops_archs_nvcc_cannot_build(monkeypatch, capsys):
    setup = _load_setup_module()
    torch_module, cuda_home = setup.cuda_toolchain()
    if torch_module is None:
        pytest.skip(cuda_home)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;99.0;9.0a+PTX")
    assert setup.buildable_archs(cuda_home) == ["9.0", "9.0a+PTX"]
    assert "dropping arch 99.0" in capsys.readouterr().err


@pytest.mark.parametrize("require", ["0", "1"])
def test_setup_without_nvcc(require):
    env = dict(os.environ, CUDA_HOME="/nonexistent", UNSLOTH_EXT_REQUIRE_CUDA_BUILD=require)
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if require == "1":
        assert result.returncode != 0
        assert "UNSLOTH_EXT_REQUIRE_CUDA_BUILD=1 but nvcc was not found" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("WARNING") == 1
        assert "pure-Python" in result.stderr
