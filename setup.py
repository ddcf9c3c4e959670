"""Build for unsloth_ext: one CUDA extension module, `unsloth_ext._C`, from csrc/.

Environment:
  TORCH_CUDA_ARCH_LIST            archs to build, default "8.0;8.6;8.9;9.0+PTX"; archs the local
                                  nvcc cannot build are dropped with a message.
  MAX_JOBS                        parallel compile jobs (honoured by ninja through torch).
  UNSLOTH_EXT_REQUIRE_CUDA_BUILD  "1": fail instead of installing the pure-Python package when
                                  torch has no CUDA or nvcc is missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
REQUIRE_CUDA = os.environ.get("UNSLOTH_EXT_REQUIRE_CUDA_BUILD", "0") == "1"


def say(msg):
    print(f"unsloth_ext setup: {msg}", file=sys.stderr)


def cuda_toolchain():
    """(torch module, CUDA_HOME) when a CUDA build is possible, else (None, reason)."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and \
            Path("/usr/local/cuda/bin/nvcc").exists():
        # Otherwise torch guesses from `which nvcc`, which may be a wrapper outside the toolkit.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return None, "torch is not installed in the build environment"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return None, "nvcc was not found (set CUDA_HOME)"
    return torch, CUDA_HOME


def buildable_archs(cuda_home):
    """Filter TORCH_CUDA_ARCH_LIST to what this nvcc can build. Returns the list as strings."""
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS).replace(",", ";").split(";")
    wanted = [a.strip() for a in wanted if a.strip()]
    out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"],
                         capture_output=True, text=True, check=True).stdout
    known = {line.strip().removeprefix("compute_") for line in out.split()}
    keep = []
    for arch in wanted:
        # "9.0a"/"10.0f" build with the plain compute target's compiler support.
        number = arch.removesuffix("+PTX").rstrip("af").replace(".", "")
        if number in known:
            keep.append(arch)
        else:
            say(f"dropping arch {arch}: this nvcc cannot build it")
    if not keep:
        raise RuntimeError(f"none of the archs {wanted} can be built by this nvcc")
    return keep


def git_sha():
    """UNSLOTH_EXT_GIT_SHA when set (builds from a copy of the tree without its history), else
    the checkout's HEAD."""
    if os.environ.get("UNSLOTH_EXT_GIT_SHA"):
        return os.environ["UNSLOTH_EXT_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def extension_setup(torch, cuda_home):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = buildable_archs(cuda_home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                     if p.suffix in (".cpp", ".cu") and p.parent.name != "bench")
    # torch's CUDA headers pull in cublas/cusparse headers, which pip CUDA builds ship here;
    # searched after the toolkit's own headers so those win.
    nvidia_include = Path(torch.__file__).parent.parent / "nvidia" / "cu13" / "include"
    after = ["-idirafter", str(nvidia_include)] if nvidia_include.is_dir() else []
    meta = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "archs": archs,
        "git_sha": git_sha(),
    }

    class BuildWithMetadata(BuildExtension):
        def run(self):
            super().run()
            # Written next to the binary so the loader can check it before dlopen.
            target = Path(self.get_ext_fullpath("unsloth_ext._C")).with_name("_C_build.json")
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            tmp.replace(target)

    ext = CUDAExtension(
        name="unsloth_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"] + after,
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    say(f"building unsloth_ext._C for archs {archs} against torch {torch.__version__} "
        f"(CUDA {torch.version.cuda})")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildWithMetadata}}


def main():
    torch, cuda_home_or_reason = cuda_toolchain()
    if torch is None:
        if REQUIRE_CUDA:
            raise RuntimeError(f"UNSLOTH_EXT_REQUIRE_CUDA_BUILD=1 but {cuda_home_or_reason}")
        say(f"WARNING: {cuda_home_or_reason}; installing the pure-Python package "
            "(every op runs through its PyTorch reference)")
        setup()
        return
    setup(**extension_setup(torch, cuda_home_or_reason))


if __name__ == "__main__":
    main()
