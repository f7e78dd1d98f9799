"""Compile every C++/CUDA source as C++17 against torch 2.11's headers (syntax only).

torch >= 2.12 builds extensions as C++20 and its headers need it, so the normal build here
cannot notice a C++20-only construct; torch 2.11 (the GPU machine's, and what users on it
build against) passes ``-std=c++17``. This check takes torch 2.11's headers from its wheel
(``pip download``, cached in ``~/.cache/cast_ext/``), and runs ``g++ -std=c++17
-fsyntax-only`` on each ``csrc`` ``.cpp`` with the CUDA and cuSPARSELt parts switched on, and
``nvcc -std=c++17`` on each ``.cu``. Exit status 1 on the first source that fails.

Run: ``python scripts/check_cxx17.py`` (in the venv; needs nvcc and the nvidia-* wheels that a
CUDA torch brings).

``--full`` (not in CI; about 5 minutes on 2 cores) then goes as far as a machine without a GPU
can towards the GPU machine's setup: it installs torch 2.11 itself (``pip install --target``,
cached beside the headers, put first on ``PYTHONPATH``; the CUDA libraries come from the
venv's nvidia-* wheels), copies the working tree (tracked and untracked, not ignored) to a
temporary folder, builds the extension there against it (C++17, CUDA kernels included) and runs
the test suite with torch 2.11, so a Python-side API that torch 2.11 lacks shows here too.
Arguments after ``--full`` go to pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "2.11.0"


def torch_headers() -> Path:
    """torch ``TORCH``'s ``include`` folder, from its wheel (downloaded once, then cached)."""
    cache = Path(os.environ.get("CAST_EXT_CACHE", Path.home() / ".cache" / "cast_ext"))
    inc = cache / f"torch-{TORCH}-include"
    if (inc / "torch" / "include" / "ATen" / "ATen.h").is_file():
        return inc / "torch" / "include"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"torch=={TORCH}", "--no-deps"]
        cmd += ["--only-binary", ":all:", "-q", "-d", tmp]
        subprocess.run(cmd, check=True)
        (wheel,) = Path(tmp).glob("torch-*.whl")
        part = inc.with_name(inc.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(part, [n for n in z.namelist() if n.startswith("torch/include/")])
        shutil.rmtree(inc, ignore_errors=True)
        part.rename(inc)
    return inc / "torch" / "include"


def full_check(pytest_args: list[str]) -> int:
    """Build the working tree against torch ``TORCH`` and run the test suite with it."""
    cache = Path(os.environ.get("CAST_EXT_CACHE", Path.home() / ".cache" / "cast_ext"))
    site = cache / f"torch-{TORCH}-site"
    if not (site / "torch" / "__init__.py").is_file():
        part = site.with_name(site.name + f".tmp{os.getpid()}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(part)]
        subprocess.run([*cmd, f"torch=={TORCH}"], check=True)
        shutil.rmtree(site, ignore_errors=True)
        part.rename(site)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cast_ext_torch211_") as tmp:
        for rel in filter(None, files):
            if (ROOT / rel).is_file():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, Path(tmp) / rel)
        env = dict(os.environ, PYTHONPATH=str(site), CAST_EXT_CUDA="1")
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
        run = dict(cwd=tmp, env=env, check=False)
        build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        if subprocess.run(build, **run).returncode:
            print(f"check_cxx17 --full: the build against torch {TORCH} FAILED", flush=True)
            return 1
        # The suite must run this build with torch TORCH, not the venv's editable install.
        probe = (
            "import cast_ext, torch, sys; print(torch.__version__, cast_ext._C.__file__); "
            f"sys.exit(not (torch.__version__.startswith('{TORCH}') "
            f"and cast_ext._C.__file__.startswith({tmp!r})))"
        )
        if subprocess.run([sys.executable, "-c", probe], **run).returncode:
            print("check_cxx17 --full: the copy does not import its own build with torch "
                  f"{TORCH}", flush=True)  # fmt: skip
            return 1
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        rc = subprocess.run(cmd, **run).returncode
    print(f"check_cxx17 --full: the test suite with torch {TORCH} "
          f"{'passed' if rc == 0 else 'FAILED'}")  # fmt: skip
    return 1 if rc else 0


def nvidia_include(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"check_cxx17: the {package} wheel is not installed (a CUDA torch brings it)")
    return Path(next(iter(spec.submodule_search_locations))) / "include"


def main() -> int:
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    headers = torch_headers()
    includes = [
        ROOT / "csrc",
        nvidia_include("nvidia.cu13"),
        nvidia_include("nvidia.cusparselt"),
        headers,
        headers / "torch" / "csrc" / "api" / "include",
        cuda_home / "include",
        Path(sysconfig.get_paths()["include"]),
    ]
    defines = [
        "-DCAST_EXT_WITH_CUDA=1",
        '-DCAST_EXT_CUDA_ARCHS="9.0"',
        "-DCAST_EXT_WITH_CUSPARSELT=1",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
    ]
    flags = ["-std=c++17", "-fopenmp", "-Wall", *defines, *(f"-I{p}" for p in includes)]
    cpp = sorted((ROOT / "csrc").rglob("*.cpp"))
    cu = sorted((ROOT / "csrc").rglob("*.cu"))
    jobs: list[tuple[Path, list[str]]] = [
        (src, ["g++", *flags, "-fsyntax-only", str(src)]) for src in cpp
    ]
    nvcc = str(cuda_home / "bin" / "nvcc")
    for src in cu:
        cmd = [nvcc, "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc'}", "-c", str(src)]
        jobs.append((src, [*cmd, "-o", os.devnull]))

    def compile_one(job: tuple[Path, list[str]]) -> tuple[Path, subprocess.CompletedProcess[str]]:
        return job[0], subprocess.run(job[1], capture_output=True, text=True)

    failed = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, proc in pool.map(compile_one, jobs):
            rel = src.relative_to(ROOT)
            if proc.returncode != 0:
                failed += 1
                print(f"check_cxx17: {rel} FAILED\n{proc.stderr[-4000:]}", flush=True)
            else:
                print(f"check_cxx17: {rel} ok", flush=True)
    print(f"check_cxx17: {len(jobs) - failed} of {len(jobs)} sources compile as C++17 "
          f"against torch {TORCH}'s headers")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    rc = main()
    if rc == 0 and sys.argv[1:2] == ["--full"]:
        rc = full_check(sys.argv[2:])
    sys.exit(rc)
