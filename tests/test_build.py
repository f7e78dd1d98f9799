"""The build: what was compiled in, every op registered for CPU and CUDA, the GPU code inside.

``CAST_EXT_EXPECT_CUDA=1`` (set by .ci/run for the CUDA build) turns "was CUDA built?" from a
fact to report into a requirement: the CI build must contain the CUDA kernels, cuSPARSELt and
sm80 + sm90 code even though the CI machine has no GPU. ``CAST_EXT_EXPECT_CUDA=0`` requires a
CPU-only build (the CAST_EXT_CUDA=0 leg of CI).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import cast_ext
from cast_ext import _C

EXPECT = os.environ.get("CAST_EXT_EXPECT_CUDA")
ROOT = Path(__file__).resolve().parents[1]
# Tracked files a source distribution leaves out: the repository's own tooling and results.
SDIST_LEAVES_OUT = re.compile(r"\.ci/|\.clang-format$|\.gitignore$|benchmarks/results/")


def all_ops() -> list[str]:
    return sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("cast_ext::")
    )


def test_build_info_keys():
    info = cast_ext.build_info()
    for key in ("torch_version", "with_cuda", "cuda_version", "cuda_archs", "with_cusparselt"):
        assert key in info
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["with_cusparselt"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", info["cusparselt_version"])
        assert info["with_cuda"]
    assert info["cpu_isa"] in ("avx512_bf16", "avx512", "avx2", "default")


def test_info_command_lines():
    from cast_ext.__main__ import info_lines

    lines = info_lines()
    isa = cast_ext.build_info()["cpu_isa"]
    assert any(line.startswith(f"CPU kernels: {isa}") for line in lines)
    ops = next(line for line in lines if line.startswith("ops ("))
    assert "adams_step_" in ops and "sparse24_gemm" in ops
    # where the kernels were loaded from (an editable install's finder can serve another tree's)
    assert f"kernels: {cast_ext._C.__file__}" in lines


def test_cli_refuses_what_it_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m cast_ext``: stray arguments, a CUDA bench without a GPU and --json with the GPU
    benchmarks are usage errors; a relative --json is the caller's path, not the checkout's; --quick
    alone writes no results file."""
    from cast_ext import __main__ as cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    bad = [["info", "bogus"], ["bench", "--device", "cpu", "stray"]]
    bad += [["bench", "--device", "cuda", "--json", "x.json"]]
    if not torch.cuda.is_available():
        bad.append(["bench", "--device", "cuda"])
    for argv in bad:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    assert "no CUDA GPU is visible" in capsys.readouterr().err or torch.cuda.is_available()
    monkeypatch.chdir(tmp_path)
    if not (Path(cli.__file__).resolve().parents[1] / "benchmarks").is_dir():
        # an installed cast_ext (the tests of an unpacked sdist): no benchmarks to run
        assert cli.main(["bench", "--device", "cpu"]) == 2
        assert "run it from a source checkout" in capsys.readouterr().out
        return
    assert cli.main(["bench", "--device", "cpu", "--json", "mine.json"]) == 0
    assert calls and f"--benchmark-json={tmp_path / 'mine.json'}" in calls[-1]
    # quick shapes never overwrite the committed full-size results
    assert cli.main(["bench", "--device", "cpu", "--quick"]) == 0
    assert not any(a.startswith("--benchmark-json") for a in calls[-1])
    assert cli.main(["bench", "--device", "cpu"]) == 0
    assert any(a.endswith("benchmarks/results/cpu.json") for a in calls[-1])


@pytest.mark.skipif(
    EXPECT != "1" or not torch.cuda.is_available(), reason="a GPU run that expects CUDA"
)
def test_cupy_is_installed_where_cuda_runs():
    """tests/test_cupy.py's independent cross-checks of the CUDA kernels skip without CuPy; where
    CUDA is expected and present (the GPU suite), a missing CuPy fails here instead."""
    assert importlib.util.find_spec("cupy") is not None, (
        "CuPy is not installed: tests/test_cupy.py's cross-checks were skipped "
        "(pip install cupy-cuda13x, or cupy-cuda12x for CUDA 12)"
    )


def _expected_archs() -> set[str]:
    """The archs the build was asked for: TORCH_CUDA_ARCH_LIST (the GPU suite builds for its
    GPU's only), else the default 8.0;9.0+PTX."""
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    return {a.replace("+PTX", "") for a in re.split(r"[;\s]+", wanted.strip()) if a}


@pytest.mark.skipif(EXPECT is None, reason="CAST_EXT_EXPECT_CUDA not set")
def test_build_matches_expectation():
    info = cast_ext.build_info()
    if EXPECT == "1":
        assert info["with_cuda"] and info["with_cusparselt"], info
        assert all(arch in info["cuda_archs"] for arch in _expected_archs()), info
    else:
        assert not info["with_cuda"], info


def composite(op: str) -> bool:
    """Whether ``op`` is made of ATen ops (a CompositeExplicitAutograd kernel, every device:
    scaled_linear) rather than kernels of its own per device."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"cast_ext::{op}", "CompositeExplicitAutograd"
    )


def test_every_op_has_cpu_and_cuda_kernels():
    ops = all_ops()
    assert {"sparse24_mask", "nm_mask", "sparse24_compress", "pack_mask"} <= set(ops)
    assert [op for op in ops if composite(op)] == ["scaled_linear"]
    for op in ops:
        if composite(op):
            continue
        name = f"cast_ext::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        # CPU-only builds register a CUDA kernel that explains the build flag (csrc/no_cuda.cpp).
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


@pytest.mark.skipif(cast_ext.cuda_kernels_available(), reason="this build has CUDA kernels")
def test_cpu_only_build_explains_cuda_calls():
    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    w = torch.randn(4, 8)
    for op in (op for op in all_ops() if not composite(op)):  # a composite one runs on CUDA
        overload = getattr(torch.ops.cast_ext, op).default
        with pytest.raises(RuntimeError, match=rf"cast_ext.{op}: .*CAST_EXT_CUDA=1"):
            args, kwargs = _sample_args(op, w)
            overload.redispatch(cuda_keys, *args, **kwargs)


def _sample_args(op: str, w: torch.Tensor) -> tuple[list, dict]:
    # Only the dispatch matters: the CPU-only CUDA kernel raises before reading any argument.
    samples = {"Tensor": w, "List[Tensor]": [w], "int": 4, "float": 0.5, "str": "none"}
    args, kwargs = [], {}
    for a in getattr(torch.ops.cast_ext, op).default._schema.arguments:
        if not a.kwarg_only:
            args.append(samples.get(str(a.type)))
        elif not a.has_default_value():
            kwargs[a.name] = samples.get(str(a.type))
    return args, kwargs


def _cuobjdump() -> str | None:
    candidates = [
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump",
        shutil.which("cuobjdump"),
    ]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c and Path(c).exists()), None)


@pytest.mark.skipif(not cast_ext.cuda_kernels_available(), reason="CPU-only build")
def test_shared_object_holds_the_archs_code():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA_HOME/bin, PATH, triton)")
    out = subprocess.run(
        [tool, "--list-elf", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    archs = set(re.findall(r"sm_(\d+)", out))
    assert {a.replace(".", "") for a in _expected_archs()} <= archs, out


def test_cuda_smoke_script_runs_on_cpu() -> None:
    """benchmarks/cuda_smoke.py (run under compute-sanitizer by the GPU suite) is itself checked.

    Loaded by path, so it does not depend on where ``benchmarks`` sits on sys.path (CI runs this
    file from copies of the tree)."""
    path = ROOT / "benchmarks" / "cuda_smoke.py"
    spec = importlib.util.spec_from_file_location("cuda_smoke", path)
    assert spec is not None and spec.loader is not None
    cuda_smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_smoke)
    cuda_smoke.main(["--device", "cpu"])


def test_sdist_holds_every_source(tmp_path: Path) -> None:
    """``pip install`` from a source distribution (what a package index serves) builds from the
    sdist alone, and setuptools adds the sources it compiles but not the headers they include:
    MANIFEST.in carries those. Every tracked file but the repository's tooling is in the sdist."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (CI also tests copies of the tree)")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    # A fresh egg-info: setuptools also lists the files of an existing SOURCES.txt.
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)]
    cmd += ["sdist", "--dist-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("cast_ext-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in filter(None, tracked) if not SDIST_LEAVES_OUT.match(f) and f not in names]
    assert not missing, f"tracked files missing from the sdist (MANIFEST.in): {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "build outputs in the sdist"


@pytest.mark.skipif(
    not (ROOT / "requirements-demo.txt").is_file(), reason="not a source checkout"
)  # CI's CMake step tests a copy of the package and its build files only
def test_the_demo_extra_pins_what_requirements_demo_pins() -> None:
    """``pip install 'cast_ext[demo]'`` (the demo from an installed copy, which has no
    requirements file; the demo's import error names the extra) installs the pins of
    requirements-demo.txt, which scripts/setup.sh installs."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = extra["optional-dependencies"]["demo"]
    lines = (ROOT / "requirements-demo.txt").read_text().splitlines()
    pins = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert extra == pins


@pytest.mark.skipif(
    not (ROOT / "requirements-dev.txt").is_file(), reason="not a source checkout"
)  # as above
def test_the_peft_extra_pins_what_requirements_dev_pins() -> None:
    """``pip install 'cast_ext[peft]'`` (cast_ext.peft; its import error names the extra)
    installs the peft that requirements-dev.txt pins for tests/test_peft.py."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert extra["optional-dependencies"]["peft"] == [ln for ln in lines if ln.startswith("peft")]


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="not a source checkout")
@pytest.mark.parametrize("command", ["--version", "bdist_wheel"])
def test_setup_without_torch(command: str) -> None:
    """Metadata and sdists need no torch (it is not a build requirement); a build without it
    (pip's isolated build) stops at once with the advice to build against the torch one runs."""
    code = (
        "import sys; sys.modules['torch'] = None; "  # import torch raises ImportError
        f"sys.argv = ['setup.py', {command!r}]; "
        "import runpy; runpy.run_path('setup.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if command == "--version":
        assert proc.returncode == 0 and proc.stdout.strip() == cast_ext.__version__, proc.stderr
    else:
        assert proc.returncode == 1 and "pip install --no-build-isolation ." in proc.stderr
        assert "install torch first" in proc.stderr


def test_a_missing_extension_in_a_checkout_says_how_to_build_it_in_place() -> None:
    """Imported from a source checkout (which shadows an installed cast_ext), the advice is an
    in-place or editable build, not the plain install that would not be imported."""
    code = "import sys; sys.modules['cast_ext._C'] = None; import cast_ext"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "could not be loaded" in proc.stderr
    if (ROOT / "setup.py").is_file():
        assert "pip install --no-build-isolation -e ." in proc.stderr and str(ROOT) in proc.stderr
    else:  # the package without its checkout (CI's CMake leg): the plain install
        assert "`pip install --no-build-isolation .`." in proc.stderr


def test_a_checkout_shadowing_an_installed_cast_ext_says_so(tmp_path: Path) -> None:
    """Run in a checkout's root after a plain install (README's `python -m cast_ext info` right
    after `pip install .`), Python imports the checkout's cast_ext, which has no _C: the error
    names the installed copy it shadows and says to run elsewhere."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source checkout")
    installed = tmp_path / "site" / "cast_ext"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    code = "import sys; sys.modules['cast_ext._C'] = None; import cast_ext"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        f"cast_ext is installed at {installed}" in proc.stderr
        and "another directory" in proc.stderr
    )


def test_info_reports_the_loaded_cusparselt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The header version the kernels were built against is not the library the process loaded
    (torch preloads its own libcusparseLt.so.0): info names both."""
    from cast_ext import __main__ as cli

    info = dict(cast_ext.build_info(), with_cusparselt=True, cusparselt_version="0.8.1")
    monkeypatch.setattr(cast_ext, "build_info", lambda: info)
    monkeypatch.setattr(cast_ext._C, "cslt_runtime_version", lambda: "0.8.0", raising=False)
    line = next(x for x in cli.info_lines() if x.startswith("with_cusparselt"))
    assert "built against cuSPARSELt 0.8.1" in line and "loaded 0.8.0" in line


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="not a source checkout")
def test_setup_refuses_an_extension_with_its_own_libstdcxx(tmp_path: Path) -> None:
    """The H200 image's /opt/gcc linked libstdc++ statically into _C.so, which then crashed at
    its first error message: setup.py reads the built file's shared libraries and refuses it."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    spec = importlib.util.spec_from_file_location("cast_ext_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    src = tmp_path / "s.cpp"
    src.write_text(
        "#include <sstream>\n#include <string>\n"
        "std::string f(long i) { std::ostringstream s; s << i; return s.str(); }\n"
    )
    shared, static = tmp_path / "shared.so", tmp_path / "static.so"
    subprocess.run([cxx, "-shared", "-fPIC", src, "-o", shared], check=True)
    subprocess.run([cxx, "-shared", "-fPIC", "-static-libstdc++", src, "-o", static], check=True)
    assert "libstdc++.so.6" in setup.elf_needed(str(shared))
    assert "libstdc++.so.6" in setup.elf_needed(str(next(ROOT.glob("cast_ext/_C*.so"))))
    setup.check_shared_libstdcxx(str(shared))
    assert shared.exists()
    with pytest.raises(SystemExit, match=r"linked libstdc\+\+ statically into static\.so"):
        setup.check_shared_libstdcxx(str(static))
    assert not static.exists()
    assert setup.elf_needed(str(src)) is None
    # The command line CMakeLists.txt runs after it links _C: FILE [CXX]
    subprocess.run([cxx, "-shared", "-fPIC", "-static-libstdc++", src, "-o", static], check=True)
    for path, rc in ((shared, 0), (static, 1)):
        cmd = [sys.executable, ROOT / "setup.py", "--check-libstdcxx", path, "/opt/gcc/bin/g++"]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == rc, run.stderr
        assert path.exists() == (rc == 0)
    assert "compiler (/opt/gcc/bin/g++) linked libstdc++ statically into static.so" in run.stderr


def test_cslt_fp16_probe_reports_a_failing_case_as_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU suite's probe of cuSPARSELt float16 faults: without a GPU it says so; a case whose
    process fails (here: no CUDA) is a row of the report, never an exception of the probe; with
    a (stand-in) GPU every case's row is written to $OUT/cslt_fp16_probe.json as it comes in."""
    import json

    from benchmarks import cslt_fp16_probe as probe

    if not torch.cuda.is_available():
        assert probe.main([]) == 0
    row = probe._child("bf16-small-search")
    assert row["case"] == "bf16-small-search"
    if torch.cuda.is_available():
        return
    assert row["result"] == "error (rc 1)" and row["message"], row
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(cast_ext, "cusparselt_available", lambda: True)
    monkeypatch.setattr(_C, "cslt_runtime_version", lambda: "0.8.0", raising=False)
    monkeypatch.setattr(probe, "_child", lambda name: {"case": name, "result": "ok"})
    monkeypatch.setenv("OUT", str(tmp_path))
    assert probe.main([]) == 0
    report = json.loads((tmp_path / "cslt_fp16_probe.json").read_text())
    assert sorted(r["case"] for r in report["results"]) == sorted(probe.CASES)
    assert report["cusparselt"] == "0.8.0" and report["capability"] == [9, 0]
