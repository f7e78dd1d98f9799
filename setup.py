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
import struct
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


def elf_needed(path: str) -> list[str] | None:
    """The DT_NEEDED entries (shared libraries) of a 64-bit little-endian ELF file, or None when
    the file is not one (another platform's format)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    needed = []
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table of the names
            continue
        strtab = sections[link][4]
        for tag, value in struct.iter_unpack("<qQ", data[offset : offset + size]):
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value : end].decode())
    return needed


def check_shared_libstdcxx(path: str, cxx: str | None = None) -> None:
    """Exit with the reason when the built extension holds its own copy of libstdc++.

    A toolchain that links libstdc++ statically (the H200 image's /opt/gcc does) builds an
    extension that imports and computes, then crashes the process at the first error message
    or stream it formats: a second C++ runtime beside the one torch loaded (a segfault in
    std::ostream inside _C.so, 2026-11-30).
    """
    needed = elf_needed(path)
    if needed is None or any(n.startswith("libstdc++.so") for n in needed):
        return
    cxx = cxx or os.environ.get("CXX", "c++")
    Path(path).unlink()
    sys.exit(
        f"setup.py: the C++ compiler ({cxx}) linked libstdc++ statically into {Path(path).name} "
        "(it needs no libstdc++.so): its own copy of the C++ runtime beside torch's crashes the "
        "process at the first error message it formats. Build with a compiler that links "
        "libstdc++ as a shared library, for example CC=/usr/bin/gcc CXX=/usr/bin/g++ (set both: "
        "nvcc's host compiler follows CC; CMake reads them in a fresh build folder). The file "
        "was removed."
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extension(self, ext) -> None:
            super().build_extension(ext)
            check_shared_libstdcxx(self.get_ext_fullpath(ext.name))

    return Build.with_options(use_ninja=True)


# Commands that only write metadata or a source archive: no compiler, no torch needed.
_METADATA_ONLY = {"sdist", "egg_info", "dist_info", "--name", "--version", "--help", "clean"}


def main() -> None:
    version = {}
    exec((ROOT / "cast_ext" / "_version.py").read_text(), version)
    ext: dict = {}
    if not _METADATA_ONLY.intersection(sys.argv[1:]):
        try:
            import torch.utils.cpp_extension  # noqa: F401
        except ImportError:
            sys.exit(
                "setup.py: cast_ext builds against the torch you run: install torch first (a CUDA "
                "build of torch for the CUDA kernels), then `pip install --no-build-isolation .` "
                "(an isolated build cannot see it)"
            )
        ext = {
            "ext_modules": _extensions(),
            "cmdclass": {"build_ext": _build_ext()},
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
    if sys.argv[1:2] == ["--check-libstdcxx"]:  # CMakeLists.txt's post-build check: FILE [CXX]
        check_shared_libstdcxx(*sys.argv[2:4])
    else:
        main()
