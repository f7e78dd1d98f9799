"""Build cast_ext._C: CPU kernels always, CUDA kernels and cuSPARSELt where possible.

Environment:
    CAST_EXT_CUDA=auto|0|1      auto (default): CUDA iff torch is a CUDA build and nvcc is found
                                (CUDA_HOME, else /usr/local/cuda); never gated on a visible GPU.
                                1: fail loudly if that is impossible. 0: CPU only.
    CAST_EXT_CUSPARSELT=auto|0|1  link cuSPARSELt from the nvidia-cusparselt wheel (CUDA builds).
    TORCH_CUDA_ARCH_LIST        default "8.0;9.0+PTX" (2:4 tensor cores need sm80+).
    CAST_EXT_DEBUG=1            -O0 -g (and -lineinfo for nvcc).
    MAX_JOBS                    parallel compile jobs (ninja).

Install with ``pip install --no-build-isolation .`` so the extension is built against the
torch you run.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _say(msg: str) -> None:
    print(f"cast_ext setup: {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [home] if home else ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if not home and nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


def _nvidia_wheel_dir(package: str) -> Path | None:
    """Directory of an ``nvidia.*`` namespace sub-package installed from a wheel."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _cuda_decision(torch_cuda: str | None) -> str | None:
    """Returns CUDA_HOME if CUDA kernels are to be built, else None."""
    mode = _flag("CAST_EXT_CUDA")
    if mode == "0":
        _say("CUDA off (CAST_EXT_CUDA=0)")
        return None
    cuda_home = _find_cuda_home()
    missing = []
    if torch_cuda is None:
        missing.append("torch is a CPU-only build (torch.version.cuda is None)")
    if cuda_home is None:
        missing.append("nvcc not found (set CUDA_HOME, or install the CUDA toolkit)")
    if missing:
        if mode == "1":
            sys.exit("setup.py: CAST_EXT_CUDA=1 but " + "; ".join(missing))
        _say("CUDA off: " + "; ".join(missing))
        return None
    _say(f"CUDA on: torch CUDA {torch_cuda}, CUDA_HOME={cuda_home}")
    return cuda_home


def _cusparselt() -> tuple[Path, Path] | None:
    """(include dir, lib dir) of cuSPARSELt from the nvidia-cusparselt wheel, or None."""
    mode = _flag("CAST_EXT_CUSPARSELT")
    if mode == "0":
        _say("cuSPARSELt off (CAST_EXT_CUSPARSELT=0)")
        return None
    root = _nvidia_wheel_dir("nvidia.cusparselt")
    if root is None or not (root / "include" / "cusparseLt.h").exists():
        if mode == "1":
            sys.exit("setup.py: CAST_EXT_CUSPARSELT=1 but no nvidia-cusparselt wheel was found")
        _say("cuSPARSELt off: the nvidia-cusparselt wheel (cusparseLt.h) was not found")
        return None
    _say(f"cuSPARSELt on: {root}")
    return root / "include", root / "lib"


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cuda_home = _cuda_decision(torch.version.cuda)
    debug = os.environ.get("CAST_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-fopenmp", "-Wall", "-Wno-unused-function"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros: list[tuple[str, str | None]] = []
    include_dirs = [str(ROOT / "csrc")]
    library_dirs: list[str] = []
    libraries: list[str] = []
    extra_link = ["-fopenmp"]

    if cuda_home is None:
        return [
            cpp_extension.CppExtension(
                "cast_ext._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx},
                extra_link_args=extra_link,
            )
        ]

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        _say(f"TORCH_CUDA_ARCH_LIST unset: building for {DEFAULT_ARCHS}")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # Space-separated in build_info(), as the CMake build reports it.
    archs_str = " ".join(a for a in archs.replace(",", ";").replace(" ", ";").split(";") if a)
    define_macros += [("CAST_EXT_WITH_CUDA", "1"), ("CAST_EXT_CUDA_ARCHS", f'"{archs_str}"')]
    nvcc = [*opt, "--expt-relaxed-constexpr", "-Xcompiler=-fPIC"]
    if debug:
        nvcc.append("-lineinfo")
    nvcc_threads = os.environ.get("NVCC_THREADS")
    if nvcc_threads:
        nvcc += ["--threads", nvcc_threads]

    # The CUDA library headers (cusparse.h, cublas_v2.h, ...) and libraries of a pip CUDA torch
    # live in the nvidia/cu13 (or cuXX) wheel folders, not always in CUDA_HOME.
    cu_wheel = next(
        (d for d in (_nvidia_wheel_dir(f"nvidia.cu{v}") for v in (13, 12)) if d is not None), None
    )
    if cu_wheel is not None:
        include_dirs.append(str(cu_wheel / "include"))
    cslt = _cusparselt()
    if cslt is not None:
        inc, lib = cslt
        include_dirs.append(str(inc))
        library_dirs.append(str(lib))
        soname = next(iter(sorted(lib.glob("libcusparseLt.so*"))), None)
        if soname is None:
            sys.exit(f"setup.py: no libcusparseLt.so* in {lib}")
        # $ORIGIN: installed next to the wheel in site-packages; absolute: in-place builds.
        rpath = f"$ORIGIN/../nvidia/cusparselt/lib:{lib}"
        extra_link += [f"-l:{soname.name}", f"-Wl,-rpath,{rpath}"]
        define_macros.append(("CAST_EXT_WITH_CUSPARSELT", "1"))

    return [
        cpp_extension.CUDAExtension(
            "cast_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            library_dirs=library_dirs,
            libraries=libraries,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
    ]


# Commands that only write metadata or a source archive: no compiler, no torch needed.
_METADATA_ONLY = {"sdist", "egg_info", "dist_info", "--name", "--version", "--help", "clean"}


def main() -> None:
    version = {}
    exec((ROOT / "cast_ext" / "_version.py").read_text(), version)
    ext: dict = {}
    if not _METADATA_ONLY.intersection(sys.argv[1:]):
        try:
            from torch.utils.cpp_extension import BuildExtension
        except ImportError:
            sys.exit(
                "setup.py: cast_ext builds against the torch you run: install torch first (a CUDA "
                "build of torch for the CUDA kernels), then `pip install --no-build-isolation .` "
                "(an isolated build cannot see it)"
            )
        ext = {
            "ext_modules": _extensions(),
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
        }
    setup(
        name="cast_ext",
        version=version["__version__"],
        packages=find_packages(include=["cast_ext", "cast_ext.*"]),
        package_data={"cast_ext": ["py.typed", "*.pyi"]},
        zip_safe=False,
        **ext,
    )


if __name__ == "__main__":
    main()
