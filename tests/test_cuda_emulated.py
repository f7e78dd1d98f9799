"""The CUDA kernels' logic, run on the CPU in an emulation, against cast_ext.reference.

No GPU is needed: csrc/cuda/sparse24_mask.cu, adams.cu and sparse24_gemv.cu are plain CUDA (no
torch headers), so g++ compiles copies of them as C++ against the stub headers of
tests/cuda_emu/, after this file rewrites the two constructs g++ cannot parse:
``kernel<<<grid, block, smem, stream>>>`` launches become calls of ``cuda_emu::launch`` and
``__shared__`` declarations register their variable (poisoned when a block starts). The emulator
runs every block in turn and each block's threads as fibers, so ``__syncthreads``, warp shuffles
and shared memory behave as on the device; it reports misaligned vector accesses, divergent
barriers and deadlocks as faults, which every test asserts away (and tests/cuda_emu/selftest.cu
checks that it does). tests/cuda_emu/shim.cpp wraps the launchers of csrc/cuda/kernels.h for
ctypes; the buffers are CPU tensors standing in for device memory.

What is compared, and why:

* every mask op bit for bit with the reference (masks, values, metadata, packed bytes, counts),
  for fp32/fp16/bf16 and the n:m patterns the launchers accept, on shapes that exercise the code
  paths of the kernels: rows of length 4 mod 8 (a half byte per row end, the scalar path), one-row
  tensors, 8-aligned rows (the 16-byte vector path), several blocks, and grid-stride loops (the
  emulator can cap gridDim, which a grid-stride kernel must tolerate);
* the device flags: non-finite weights (``bad``) and invalid 2:4 metadata (``bad_meta``);
* the packed small-M GEMM (sparse24_gemv.cu) against ``reference.sparse24_gemm`` within the fp32
  accumulation bound (its summation order is the warp's, not the reference's), with bias, every
  M up to the limit, rows whose chunks split unevenly across lanes, invalid metadata, and the
  arguments it must refuse;
* outputs live in guarded buffers pre-filled with garbage, so an unwritten output or a write out of
  bounds fails;
* AdamS bit for bit against the CPU kernel ``cast_ext.ops.adams_step_`` (the header of adams.cu
  claims that agreement; both share csrc/adams_coeffs.h and csrc/nm_select.h) and against the
  reference (masks, prev masks and steps exactly, floats to the tolerance of tests/test_adams.py),
  over lists long enough for several launches and chunks, with per-tensor steps crossing refreshes
  and ``total_steps``, grad_scale and found_inf, and thread schedules that expose missing barriers.

The emulation cannot see what only the hardware does: timing and real concurrency (fibers of one
OS thread interleave only at barriers and shuffles, so inter-block races and memory ordering are
invisible), nvcc's code generation (g++ contracts ``a * b + c`` into FMAs here, as nvcc does, but
not necessarily the same ones; the device's libm), the placement and alignment of local arrays
(g++ decides them here), register, shared-memory and launch-bounds limits, and reads out of
bounds (only writes are guarded).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    ADAMS_HP,
    ADAMS_LIST_KEYS,
    adams_args,
    assert_adams_state_close,
    clone_lists,
    distill_inf_inputs,
    distill_inputs,
    distill_peaked_inputs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import cast_ext
from cast_ext import reference

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"
KERNEL_SOURCES = (
    ROOT / "csrc" / "cuda" / "sparse24_mask.cu",
    ROOT / "csrc" / "cuda" / "adams.cu",
    ROOT / "csrc" / "cuda" / "sparse24_gemv.cu",
    ROOT / "csrc" / "cuda" / "distill.cu",
    EMU_DIR / "selftest.cu",  # deliberate defects the emulator must report
)
CXXFLAGS = [
    "-std=c++20",
    "-O1",
    # a * b + c contracted into an FMA where the compiler sees fit, as nvcc does by default (the
    # __f*_rn intrinsics stay single roundings in the stubs too), where this CPU has FMA
    *(
        ["-mfma", "-ffp-contract=fast"]
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        else ["-ffp-contract=off"]
    ),
    "-fno-strict-aliasing",  # the kernels reinterpret tiles as uint2/uint4, as CUDA code does
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",  # #pragma unroll
    f"-I{EMU_DIR}",  # first: the stub cuda_runtime.h, cuda_fp16.h, cuda_bf16.h
    f"-I{ROOT / 'csrc'}",
]

F32, F16, BF16 = 0, 1, 2  # cast_ext::cuda::DType
DTYPE_CODE = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
MASK, PRUNE, COMPRESS = 0, 1, 2  # cast_ext::cuda::MaskOut
CUDA_SUCCESS, CUDA_INVALID_VALUE, CUDA_INVALID_CONFIGURATION, CUDA_MISALIGNED = 0, 1, 9, 716
THREADS = 256  # kThreads of both .cu files: one unit (packed-mask byte) per thread and pass
# Thread orders between barriers: ascending, descending, random, warps running ahead (cuda_emu.h).
SCHEDULES = (0, 1, 2, 3)

# ---- rewriting the CUDA-only syntax ------------------------------------------------------------

# `name`, `ns::name`, optionally `<template args>` (one level of nesting), then blanks or
# backslash-newlines (a launch inside a multi-line macro), then `<<<config>>>`.
LAUNCH_RE = re.compile(
    r"(?P<kernel>\b(?:[A-Za-z_]\w*::)*[A-Za-z_]\w*(?:\s*<(?:[^<>;{}()]|<[^<>;{}()]*>)*>)?)"
    r"(?P<gap>(?:\s|\\\n)*)<<<(?P<cfg>.*?)>>>",
    re.S,
)
# `__shared__ T name;` or `__shared__ T name[N]...;` (one declarator, no initializer).
SHARED_RE = re.compile(
    r"\b__shared__\s+(?P<decl>[^;{}()=,]*?\b(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\]]*\]\s*)*);"
)


def rewrite_cuda(src: str) -> str:
    """g++-parsable C++ from CUDA source, line for line (compiler messages keep their lines).

    ``k<<<g, b, s, st>>>(args)`` becomes
    ``::cuda_emu::launch([](const auto&... a) { k(a...); }, g, b, s, st)(args)``: the lambda lets
    the call deduce the kernel's template arguments from the launch arguments, as nvcc does.
    ``__shared__ T x;`` becomes ``static T x; ::cuda_emu::shared_declared(&x, sizeof(x));``.
    """

    def launch(mo: re.Match[str]) -> str:
        kernel, gap, cfg = mo["kernel"], mo["gap"], mo["cfg"]
        return f"::cuda_emu::launch([](const auto&... a) {{ {kernel}{gap}(a...); }}, {cfg})"

    def shared(mo: re.Match[str]) -> str:
        name = mo["name"]
        return f"static {mo['decl']}; ::cuda_emu::shared_declared(&{name}, sizeof({name}));"

    out = LAUNCH_RE.sub(launch, src)
    if "extern __shared__" in out:
        raise NotImplementedError("dynamic shared memory is not emulated")
    out = SHARED_RE.sub(shared, out)
    code = re.sub(r"//[^\n]*", "", out)  # comments may mention anything
    left = [t for t in ("<<<", "__shared__") if t in code]  # `>>>` may close templates
    if left:
        raise ValueError(f"CUDA syntax the harness cannot rewrite: {left}")
    if out.count("\n") != src.count("\n"):
        raise AssertionError("the rewrite must keep the line count")
    return out


def test_rewrite_cuda_syntax() -> None:
    """The launch and __shared__ rewrites on the forms the kernels use, lines preserved."""
    src = (
        "  k<<<g, 256, 0, s>>>(a, b);\n"
        "  ns::kern<T, M, MaskOut::Mask><<<dim3(g, 2), kThreads>>>();\n"
        "  nested<Pack8<T>, 4> <<<1, 32, 0, st>>>(x);\n"
        "#define L(M)      \\\n"
        "  my_kernel<T, M> \\\n"
        "      <<<grid, kThreads, 0, s>>>(w, n)\n"
        "  __shared__ AdamsCoeffs shared_c;\n"
        "  __shared__ float tile[32][33];\n"
    )
    out = rewrite_cuda(src)
    lines = out.split("\n")
    assert (
        lines[0] == "  ::cuda_emu::launch([](const auto&... a) { k(a...); }, g, 256, 0, s)(a, b);"
    )
    assert lines[1] == (
        "  ::cuda_emu::launch([](const auto&... a) { ns::kern<T, M, MaskOut::Mask>(a...); }, "
        "dim3(g, 2), kThreads)();"
    )
    assert "{ nested<Pack8<T>, 4> (a...); }, 1, 32, 0, st)(x);" in lines[2]
    assert lines[4] == "  ::cuda_emu::launch([](const auto&... a) { my_kernel<T, M> \\"
    assert lines[5] == "      (a...); }, grid, kThreads, 0, s)(w, n)"
    assert lines[6] == (
        "  static AdamsCoeffs shared_c; ::cuda_emu::shared_declared(&shared_c, sizeof(shared_c));"
    )
    assert lines[7].startswith("  static float tile[32][33]; ::cuda_emu::shared_declared(&tile,")
    assert rewrite_cuda("std::vector<std::vector<std::vector<int>>> v;") == (
        "std::vector<std::vector<std::vector<int>>> v;"
    )
    for bad in ("extern __shared__ float dyn[];", "__shared__ float a = 1;", "k<<<1, 2>>"):
        with pytest.raises((NotImplementedError, ValueError)):
            rewrite_cuda(bad)


# ---- building and loading the emulated kernels -------------------------------------------------


class Emu:
    """The emulated launchers (tests/cuda_emu/shim.cpp) and the emulator's controls."""

    def __init__(self, lib: ctypes.CDLL, build_log: str) -> None:
        self.lib = lib
        self.build_log = build_log
        vp, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        sigs = {
            "emu_nm_select": [i32, i32, vp, i64, i64, i32, i32, vp, vp, vp, vp],
            "emu_sparse24_decompress": [i32, vp, vp, i64, i64, vp, vp],
            "emu_pack_mask": [vp, i64, i64, vp],
            "emu_unpack_mask": [vp, i64, i64, vp],
            "emu_mask_flips": [vp, vp, i64, i32, vp],
            "emu_adams_step": [i32, i32, i32, vp, i64, vp, vp, vp, vp, i32],
            "emu_sparse24_gemv": [i32, vp, vp, vp, vp, i64, i64, i64, vp, i32, vp],
            "emu_distill_fwd": [i32, vp, vp, vp, i64, i64, f64, i64, vp, vp, vp, i32, vp],
            "emu_distill_bwd": [i32, vp, vp, vp, vp, vp, i64, i64, f64, f64, i64, vp, i32],
        }
        for name, args in sigs.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = i32
        lib.cuda_emu_set_max_grid.argtypes = [ctypes.c_uint]
        lib.cuda_emu_set_occupancy.argtypes = [i32]
        lib.cuda_emu_set_schedule.argtypes = [i32, ctypes.c_ulonglong]
        lib.cuda_emu_fault.restype = ctypes.c_char_p
        lib.cuda_emu_stats.argtypes = [vp]
        lib.cuda_emu_grids.argtypes = [vp, ctypes.c_longlong]
        lib.cuda_emu_grids.restype = ctypes.c_longlong

    def configure(
        self, *, max_grid: int = 0, schedule: int = 0, seed: int = 1, occupancy: int = 8
    ) -> None:
        """Cap gridDim.x (0: none); thread order 0 ascending, 1 descending, 2 random(seed), 3 warp
        by warp, the last first, each running ahead to its next barrier; the blocks per SM that
        cudaOccupancyMaxActiveBlocksPerMultiprocessor reports (<= 0: the query fails)."""
        self.lib.cuda_emu_set_max_grid(max_grid)
        self.lib.cuda_emu_set_schedule(schedule, seed)
        self.lib.cuda_emu_set_occupancy(occupancy)

    def call(self, name: str, *args: object) -> int:
        """Runs one launcher; asserts the emulated kernels raised no fault; returns cudaError_t."""
        self.lib.cuda_emu_reset()
        rc = getattr(self.lib, name)(*args)
        fault = self.lib.cuda_emu_fault().decode()
        assert not fault, f"{name}: emulated kernel fault: {fault}"
        return rc

    def stats(self) -> dict[str, int]:
        """Counters of the last call: launches, blocks, barriers, warp_syncs."""
        out = (ctypes.c_longlong * 4)()
        self.lib.cuda_emu_stats(out)
        return dict(zip(("launches", "blocks", "barriers", "warp_syncs"), out, strict=True))

    def grids(self) -> list[int]:
        """gridDim.x of each launch of the last call."""
        out = (ctypes.c_longlong * 4096)()
        n = self.lib.cuda_emu_grids(out, 4096)
        return list(out[: min(n, 4096)])


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory: pytest.TempPathFactory) -> Emu:
    """Compiles the .cu files (rewritten), the emulator and the shim once per session, in
    parallel (a few seconds); skips only where there is no g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CUDA emulation compiles the .cu files as C++")
    out = tmp_path_factory.mktemp("cuda_emu")
    sources = [EMU_DIR / "cuda_emu.cpp", EMU_DIR / "shim.cpp"]
    for cu in KERNEL_SOURCES:
        src = out / f"{cu.stem}_emu.cpp"
        src.write_text(f'#line 1 "{cu}"\n' + rewrite_cuda(cu.read_text()))
        sources.append(src)
    procs = []
    for src in sources:  # in parallel: a few seconds in all
        obj = out / f"{src.stem}.o"
        cmd = [cxx, *CXXFLAGS, "-c", str(src), "-o", str(obj)]
        procs.append((obj, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
    log = []
    for _, p in procs:
        _, err = p.communicate()
        log.append(err)
        assert p.returncode == 0, f"compiling the emulation failed:\n{err}"
    lib_path = out / "libcast_cuda_emu.so"
    link = [cxx, "-shared", "-o", str(lib_path), *(str(o) for o, _ in procs)]
    subprocess.run(link, check=True, capture_output=True, text=True)
    return Emu(ctypes.CDLL(str(lib_path)), "".join(log))


@pytest.fixture
def emu(emu_lib: Emu) -> Iterator[Emu]:
    emu_lib.configure()
    yield emu_lib
    emu_lib.configure()


def test_emulation_compiles_without_warnings(emu_lib: Emu) -> None:
    """g++ -Wall -Wextra finds nothing to say about the kernels as C++ (nor about the stubs)."""
    assert emu_lib.build_log == "", emu_lib.build_log


def test_emulator_reports_defects(emu: Emu) -> None:
    """The emulator itself (tests/cuda_emu/selftest.cu): shuffles and barriers give the device's
    results, and each defect it claims to catch is reported as a fault, or as a launch error for
    an invalid configuration. A harness that silently tolerated these would prove nothing."""
    lib = emu.lib
    lib.cuda_emu_selftest.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p]
    out = torch.zeros(4096, dtype=torch.int32)

    def run(which: int, grid: int, block: int) -> tuple[int, str]:
        lib.cuda_emu_reset()
        out.zero_()
        rc = lib.cuda_emu_selftest(which, grid, block, out.data_ptr())
        return rc, lib.cuda_emu_fault().decode()

    assert run(0, 3, 128) == (CUDA_SUCCESS, "")  # shuffle_sum
    lanes = torch.arange(3 * 128).view(-1, 32)
    assert out[: lanes.shape[0]].tolist() == (lanes % 128).sum(1).tolist()
    assert emu.stats()["warp_syncs"] == 3 * 4 * 5 * 2
    for schedule in SCHEDULES:
        emu.configure(schedule=schedule, seed=7)
        assert run(1, 2, 64) == (CUDA_SUCCESS, "")  # shared_broadcast
        assert out[:128].tolist() == [100] * 64 + [101] * 64
        assert emu.stats()["barriers"] == 2
        # shared_race: thread 0 runs first (ascending) and hides the race; any other order shows
        # the poison of a fresh block (0xFFFFFFFF) in the threads that run before it.
        assert run(2, 2, 64) == (CUDA_SUCCESS, "")
        raced = out[:128] != torch.tensor([100] * 64 + [101] * 64)
        assert bool(raced.any()) == (schedule != 0)
        assert bool((out[:128][raced] == -1).all())
    # shared_reuse_race (no barrier after the read of a slot rewritten in the next pass): only
    # warps running ahead (schedule 3) show it; thread 0 then reads pass 2's partial sums.
    for schedule in SCHEDULES:
        emu.configure(schedule=schedule, seed=7)
        assert run(7, 1, 128) == (CUDA_SUCCESS, "")
        want = [10, 20]  # warps 1..4 times (pass + 1)
        assert (out[:2].tolist() != want) == (schedule == 3), (schedule, out[:2].tolist())
    emu.configure()
    faults = {3: "different lines", 4: "exited lane", 5: "deadlock", 6: "misaligned address"}
    for which, what in faults.items():
        rc, fault = run(which, 1, 64)
        assert rc == CUDA_SUCCESS and what in fault, (which, fault)
    for grid, block in ((1, 2048), (0, 64), (1, 0)):
        assert run(0, grid, block) == (CUDA_INVALID_CONFIGURATION, "")
        assert emu.stats()["launches"] == 0


# ---- buffers -----------------------------------------------------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: Tensor) -> Tensor:
    """The raw bits of t (so -0.0 != 0.0, and a bool byte other than 0/1 shows)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def assert_bits_equal(got: Tensor, want: Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    gb, wb = bits(got), bits(want)
    diff = gb != wb
    if bool(diff.any()):
        i = tuple(int(j) for j in diff.nonzero()[0])
        mask = (1 << (8 * got.element_size())) - 1
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {diff.numel()} differ; first at {list(i)}: "
            f"got {got[i].item()!r} (0x{int(gb[i]) & mask:x}), "
            f"want {want[i].item()!r} (0x{int(wb[i]) & mask:x})"
        )


class Guarded:
    """An output buffer pre-filled with garbage, between two guard zones of the same garbage.

    The buffer starts 64 bytes into a fresh allocation (so it is 16-byte aligned, as the glue's
    allocations are); ``check()`` asserts that nothing was written outside it.
    """

    PAD = 64

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, fill: int = 0xA5, offset: int = 0
    ) -> None:
        nbytes = math.prod(shape) * dtype.itemsize
        self.fill = fill
        self.start = self.PAD + offset  # offset: bytes past the aligned start (misalignment)
        self.raw = torch.full((nbytes + 2 * self.PAD,), fill, dtype=torch.uint8)
        self.t = self.raw[self.start : self.start + nbytes].view(dtype).view(shape)
        self.nbytes = nbytes

    @property
    def ptr(self) -> int:
        return self.raw.data_ptr() + self.start

    def check(self, what: str) -> None:
        guards = torch.cat([self.raw[: self.start], self.raw[self.start + self.nbytes :]])
        assert bool((guards == self.fill).all()), f"{what}: written out of bounds"


def call_flagged(
    emu: Emu,
    fn: str,
    args: tuple[Any, ...],
    outs: dict[str, Guarded],
    flag: str,
    null_flag: bool = False,
) -> tuple[int, int]:
    """Calls ``fn(*args, flag_ptr)`` with a device int flag as the glue passes it (zeroed by the
    caller, the launcher's last argument), checks the guard zones of every output and of the
    flag, and returns (rc, flag value). ``null_flag`` passes nullptr instead, as the glue does
    when it will not read the flag (the value returned is then 0)."""
    if null_flag:
        rc = emu.call(fn, *args, None)
        for name, g in outs.items():
            g.check(name)
        return rc, 0
    bad = Guarded((1,), torch.int32)
    bad.t.zero_()
    rc = emu.call(fn, *args, bad.ptr)
    for name, g in outs.items():
        g.check(name)
    bad.check(flag)
    return rc, int(bad.t.item())


def make_weights(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Random weights full of ties (equal magnitudes, ±0), plus extremes of the dtype.

    Ties test the lower-index rule; the largest finite value must not raise ``bad``; subnormals
    must rank by magnitude (the device does not flush them by default).
    """
    coarse = torch.randint(-3, 4, shape, generator=gen).float() * 0.5
    fine = torch.randn(shape, generator=gen)
    pick = torch.rand(shape, generator=gen)
    w = torch.where(pick < 0.5, coarse, fine)
    w = torch.where((w == 0) & (pick < 0.25), torch.tensor(-0.0), w)
    w = w.to(dtype)
    flat = w.view(-1)
    if flat.numel() >= 16:
        fi = torch.finfo(dtype)
        specials = [fi.max, -fi.max, fi.tiny, -fi.tiny / 2, fi.tiny / 4, fi.smallest_normal]
        idx = torch.randperm(flat.numel(), generator=gen)[: len(specials)]
        for i, v in zip(idx.tolist(), specials, strict=True):
            flat[i] = v
    return w


# ---- nm_select: masks, pruning, 2:4 compression ------------------------------------------------

SHAPES_M4 = [(1, 4), (3, 12), (5, 36), (1, 8), (2, 16), (7, 40), (1, 8196), (64, 100), (33, 256)]
SHAPES_M8 = [(1, 8), (2, 16), (3, 24), (7, 40), (1, 8200), (33, 256), (64, 96)]
NM = [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8)]


def units(rows: int, k: int) -> int:
    return rows * ((k + 7) // 8)


def grid_for(work: int, cap: int = 65535 * 8) -> int:
    """The launchers' grid: one thread per unit, at most ``cap`` blocks."""
    return max(1, min(-(-work // THREADS), cap))


def select_grid(rows: int, k: int, dtype: torch.dtype) -> int:
    """nm_select's grid: a thread takes 2 units of fp16/bf16 (kSelectUnits), 1 of fp32."""
    per_thread = 1 if dtype == torch.float32 else 2
    return grid_for(-(-units(rows, k) // per_thread))


def run_nm_select(
    emu: Emu, w: Tensor, mode: int, n: int, m: int, out_offset: int = 0, null_flag: bool = False
) -> tuple[int, dict[str, Tensor], int]:
    """The launcher as csrc/cuda/sparse24_mask_cuda.cpp calls it: (rc, outputs, bad flag).
    out_offset misaligns the mask or values output by that many bytes."""
    rows, k = w.shape
    outs: dict[str, Guarded] = {}
    if mode == MASK:
        outs["mask"] = Guarded((rows, k), torch.bool, offset=out_offset)
    elif mode == PRUNE:
        outs["values"] = Guarded((rows, k), w.dtype, offset=out_offset)
    else:
        outs["values"] = Guarded((rows, k // 2), w.dtype, offset=out_offset)
        outs["meta"] = Guarded((rows, (k + 7) // 8), torch.uint8)
    ptr = {name: g.ptr for name, g in outs.items()}
    args = (DTYPE_CODE[w.dtype], mode, w.data_ptr(), rows, k, n, m)
    args += (ptr.get("mask"), ptr.get("values"), ptr.get("meta"))
    rc, bad = call_flagged(emu, "emu_nm_select", args, outs, "bad", null_flag)
    return rc, {name: g.t for name, g in outs.items()}, bad


def check_nm_select(emu: Emu, w: Tensor, n: int, m: int, what: str, grid: int) -> None:
    """Every mode the launcher accepts for (n, m), bit for bit against the reference; each
    launch ran with gridDim.x == grid."""
    keep = reference.nm_mask(w, n, m)
    rc, out, bad = run_nm_select(emu, w, MASK, n, m)
    assert (rc, bad, emu.grids()) == (CUDA_SUCCESS, 0, [grid]), what
    assert_bits_equal(out["mask"], keep, f"{what} mask")
    rc, out, bad = run_nm_select(emu, w, PRUNE, n, m)
    assert (rc, bad, emu.grids()) == (CUDA_SUCCESS, 0, [grid]), what
    assert_bits_equal(out["values"], torch.where(keep, w, torch.zeros((), dtype=w.dtype)), what)
    if (n, m) == (2, 4):
        rc, out, bad = run_nm_select(emu, w, COMPRESS, n, m)
        assert (rc, bad, emu.grids()) == (CUDA_SUCCESS, 0, [grid]), what
        values, meta = reference.sparse24_compress(w)
        assert_bits_equal(out["values"], values, f"{what} compressed values")
        assert_bits_equal(out["meta"], meta, f"{what} meta")
    elif m == 8:  # compression is 2:4 only: refused before any launch
        rc, _, _ = run_nm_select(emu, w, COMPRESS, n, m)
        assert rc == CUDA_INVALID_VALUE, what
        assert emu.stats()["launches"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nm", NM, ids=lambda nm: f"{nm[0]}:{nm[1]}")
def test_nm_select(emu: Emu, dtype: torch.dtype, nm: tuple[int, int]) -> None:
    """Masks, pruned weights and 2:4 compression equal the reference on every shape class.

    Shapes with several blocks run twice: with the launcher's grid (asserted) and with gridDim
    capped at 2, so every thread's grid-stride loop takes several iterations.
    """
    n, m = nm
    gen = torch.Generator().manual_seed(1000 * n + m)
    for shape in SHAPES_M4 if m == 4 else SHAPES_M8:
        w = make_weights(shape, dtype, gen)
        what = f"{dtype} {n}:{m} {list(shape)}"
        check_nm_select(emu, w, n, m, what, select_grid(*shape, dtype))
        if units(*shape) > THREADS:
            emu.configure(max_grid=2)
            check_nm_select(emu, w, n, m, f"{what} grid 2", 2)
            emu.configure()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nm_select_flags_non_finite(emu: Emu, dtype: torch.dtype) -> None:
    """One NaN or ±Inf anywhere (first, middle, last element of a row-end half byte, or in a
    later block) raises ``bad`` in every mode; finite extremes do not (test_nm_select)."""
    gen = torch.Generator().manual_seed(7)
    for shape in [(3, 12), (2, 16), (64, 100)]:
        w0 = make_weights(shape, dtype, gen)
        for value in (math.nan, math.inf, -math.inf):
            for pos in (0, w0.numel() // 2, w0.numel() - 1):
                w = w0.clone()
                w.view(-1)[pos] = value
                for mode in (MASK, PRUNE, COMPRESS):
                    rc, _, bad = run_nm_select(emu, w, mode, 2, 4)
                    assert (rc, bad) == (CUDA_SUCCESS, 1), f"{shape} {value} at {pos} mode {mode}"


def test_nm_select_alignment_and_empty(emu: Emu) -> None:
    """The launcher refuses a misaligned input or output when rows allow vector access
    (k % 8 == 0) and takes the scalar path otherwise (the emulator faults on any misaligned
    vector access, so a missing check would show); empty tensors launch nothing."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        base = make_weights((4 * 24 + 1,), dtype, gen)
        w = base[1:].view(4, 24)  # 4 (or 2) bytes past a 64-byte boundary
        for mode in (MASK, PRUNE, COMPRESS):
            rc, out, _ = run_nm_select(emu, w, mode, 2, 4)
            assert (rc, emu.stats()["launches"]) == (CUDA_MISALIGNED, 0), mode
            for t in out.values():
                assert bool((bits(t).view(torch.uint8) == 0xA5).all()), "nothing may be written"
            aligned = w.clone()
            for off in (dtype.itemsize, 8):
                rc, _, _ = run_nm_select(emu, aligned, mode, 2, 4, out_offset=off)
                assert (rc, emu.stats()["launches"]) == (CUDA_MISALIGNED, 0), (mode, off)
        w = base[1:].view(8, 12)  # k % 8 == 4: scalar loads, any alignment
        check_nm_select(emu, w, 2, 4, f"{dtype} misaligned k=12", 1)
        for mode in (MASK, PRUNE, COMPRESS):  # and scalar stores to misaligned outputs
            rc, out, bad = run_nm_select(emu, w, mode, 2, 4, out_offset=dtype.itemsize)
            assert (rc, bad) == (CUDA_SUCCESS, 0)
        assert_bits_equal(out["meta"], reference.sparse24_compress(w)[1], "meta")
    for shape in [(0, 8), (3, 0)]:
        rc, _, bad = run_nm_select(emu, torch.zeros(shape), MASK, 2, 4)
        assert (rc, bad, emu.stats()["launches"]) == (CUDA_SUCCESS, 0, 0)


# ---- sparse24_decompress -----------------------------------------------------------------------

POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)])


PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(
    rows=st.integers(1, 40),
    groups=st.integers(1, 300),
    nm=st.sampled_from(NM),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    max_grid=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 2**16),
    schedule=st.sampled_from(SCHEDULES),
)
def test_nm_select_property(
    emu_lib: Emu, rows: int, groups: int, nm: tuple[int, int], dtype: torch.dtype,
    max_grid: int, seed: int, schedule: int,
) -> None:  # fmt: skip
    """Any shape (k = groups * m: rows that are and are not 8-aligned), N:M, dtype, grid cap
    and thread schedule: the mask, pruned weights and 2:4 compression equal the reference bit
    for bit, on tie-heavy weights with the dtype's extremes."""
    n, m = nm
    emu_lib.configure(schedule=schedule, seed=seed, max_grid=max_grid)
    w = make_weights((rows, groups * m), dtype, torch.Generator().manual_seed(seed))
    want = select_grid(rows, groups * m, dtype)
    grid = want if max_grid == 0 else min(max_grid, want)
    check_nm_select(emu_lib, w, n, m, f"{dtype} {n}:{m} {list(w.shape)}", grid)
    emu_lib.configure()


def run_decompress(
    emu: Emu, values: Tensor, meta: Tensor, null_flag: bool = False, out_offset: int = 0
) -> tuple[int, Tensor, int]:
    rows, k = values.shape[0], values.shape[1] * 2
    out = Guarded((rows, k), values.dtype, offset=out_offset)
    args = (DTYPE_CODE[values.dtype], values.data_ptr(), meta.data_ptr(), rows, k, out.ptr)
    rc, bad = call_flagged(
        emu, "emu_sparse24_decompress", args, {"out": out}, "bad_meta", null_flag
    )
    return rc, out.t, bad


def expected_decompress(values: Tensor, meta: Tensor) -> tuple[Tensor, int]:
    """The kernels' contract (CPU and CUDA alike): a 2:4 group is valid iff its nibble has exactly
    2 bits; valid groups decompress as the reference does, an invalid one gives 4 zeros and leaves
    its neighbour alone. The flag is raised by an invalid group or by bits past a row's end (the
    upper nibble of a row-end half byte). Returns (output, flag)."""
    rows, kb = meta.shape
    k = values.shape[-1] * 2
    nibbles = torch.stack([meta.long() & 0xF, meta.long() >> 4], dim=-1).view(rows, 2 * kb)
    groups = nibbles[:, : k // 4]
    valid = POPCOUNT[groups] == 2
    fixed = torch.where(valid, groups, 0x3)
    padded = torch.zeros(rows, 2 * kb, dtype=torch.long)
    padded[:, : k // 4] = fixed
    fixed_meta = (padded[:, 0::2] | (padded[:, 1::2] << 4)).to(torch.uint8)
    out = reference.sparse24_decompress(values, fixed_meta)
    out = torch.where(valid.repeat_interleave(4, dim=-1), out, torch.zeros((), dtype=out.dtype))
    past_end = bool((nibbles[:, k // 4 :] != 0).any())
    return out, int(past_end or not bool(valid.all()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decompress(emu: Emu, dtype: torch.dtype) -> None:
    """Compress-then-decompress equals the reference bit for bit without flag; corrupted bytes
    (wrong bit counts in either group, bits past a row end) raise ``bad_meta`` and decompress as
    ``expected_decompress`` says: zeros for the invalid group only."""
    gen = torch.Generator().manual_seed(11)
    # Full bytes: one or both groups invalid. Row-end half bytes: lower group valid or not, with
    # or without bits above it.
    invalid_full = torch.tensor([0x00, 0x01, 0x07, 0x0F, 0x3F, 0x13, 0xF3, 0x31, 0x1E, 0xE7])
    invalid_half = torch.tensor([0x33, 0x13, 0x01, 0x07, 0x00, 0x53, 0x8F, 0x10])
    for shape in SHAPES_M4:
        w = make_weights(shape, dtype, gen)
        values, meta = reference.sparse24_compress(w)
        rc, out, bad = run_decompress(emu, values, meta)
        assert (rc, bad) == (CUDA_SUCCESS, 0), shape
        assert_bits_equal(out, reference.sparse24_prune(w), f"{list(shape)} round trip")
        assert emu.grids() == [grid_for(units(*shape))]
        rows, kb = meta.shape
        k = shape[1]
        for trial in range(4):
            corrupt = meta.clone()
            for _ in range(1 + trial):
                r = int(torch.randint(rows, (1,), generator=gen))
                j = int(torch.randint(kb, (1,), generator=gen))
                pool = invalid_full if 8 * j + 8 <= k else invalid_half
                corrupt[r, j] = int(pool[int(torch.randint(len(pool), (1,), generator=gen))])
            want, want_bad = expected_decompress(values, corrupt)
            assert want_bad == 1
            rc, out, bad = run_decompress(emu, values, corrupt)
            assert (rc, bad) == (CUDA_SUCCESS, 1), shape
            assert_bits_equal(out, want, f"{list(shape)} corrupt {trial}")
        if units(*shape) > THREADS:
            emu.configure(max_grid=2)
            rc, out, bad = run_decompress(emu, values, corrupt)
            assert (rc, bad, emu.grids()) == (CUDA_SUCCESS, 1, [2])
            assert_bits_equal(out, want, f"{list(shape)} grid 2")
            emu.configure()


def test_decompress_alignment(emu: Emu) -> None:
    """A misaligned output is refused (nothing launched or written) when rows take 16-byte
    stores (k % 8 == 0), and written with scalar stores otherwise (the emulator faults on any
    misaligned vector access)."""
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        for k, offset in ((24, dtype.itemsize), (24, 8), (12, dtype.itemsize)):
            w = make_weights((4, k), dtype, gen)
            values, meta = reference.sparse24_compress(w)
            rc, out, bad = run_decompress(emu, values, meta, out_offset=offset)
            if k % 8:
                assert (rc, bad) == (CUDA_SUCCESS, 0), (dtype, k, offset)
                assert_bits_equal(out, reference.sparse24_prune(w), f"{dtype} k={k}")
            else:
                assert (rc, emu.stats()["launches"]) == (CUDA_MISALIGNED, 0), (dtype, offset)
                assert bool((bits(out).view(torch.uint8) == 0xA5).all()), "nothing written"


# ---- pack_mask, unpack_mask, mask_flips --------------------------------------------------------

PACK_SHAPES = [(1, 1), (3, 5), (2, 8), (4, 12), (3, 13), (1, 100), (70, 37), (300, 37), (9, 2048)]


@pytest.mark.parametrize("max_grid", [0, 2], ids=["grid", "grid2"])
def test_pack_unpack(emu: Emu, max_grid: int) -> None:
    """pack_mask and unpack_mask equal the reference for any row length (padding bits of the last
    byte: written as 0 by pack, ignored by unpack). The mask's bytes are 0, 1 and 2: a bool whose
    byte is 2 (a uint8 tensor viewed as bool) is true, as torch reads it, and sets one bit."""
    gen = torch.Generator().manual_seed(5)
    emu.configure(max_grid=max_grid)
    for rows, k in PACK_SHAPES:
        kb = (k + 7) // 8
        raw_mask = torch.randint(0, 3, (rows, k), generator=gen, dtype=torch.uint8)
        mask = raw_mask != 0
        packed = Guarded((rows, kb), torch.uint8)
        assert emu.call("emu_pack_mask", raw_mask.data_ptr(), rows, k, packed.ptr) == CUDA_SUCCESS
        packed.check("packed")
        assert_bits_equal(packed.t, reference.pack_mask(mask), f"pack {rows}x{k}")
        want_grid = grid_for(units(rows, k))
        assert emu.grids() == [min(want_grid, max_grid) if max_grid else want_grid]
        raw = torch.randint(0, 256, (rows, kb), generator=gen, dtype=torch.uint8)  # padding set
        out = Guarded((rows, k), torch.bool)
        assert emu.call("emu_unpack_mask", raw.data_ptr(), rows, k, out.ptr) == CUDA_SUCCESS
        out.check("mask")
        assert_bits_equal(out.t, reference.unpack_mask(raw, k), f"unpack {rows}x{k}")
    assert emu.call("emu_pack_mask", None, 0, 8, None) == CUDA_SUCCESS
    assert emu.stats()["launches"] == 0


def flips_grid(nbytes: int, aligned: bool) -> int:
    """mask_flips' grid: a thread per 16-byte unit (per byte where a pointer is not 16-byte
    aligned), at most 4096 blocks."""
    return grid_for(-(-nbytes // 16) if aligned else nbytes, cap=4096)


@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("max_grid", [0, 3], ids=["grid", "grid3"])
@pytest.mark.parametrize("offset", [0, 1, 8], ids=["aligned", "odd", "half"])
def test_mask_flips(emu: Emu, m: int, max_grid: int, offset: int) -> None:
    """Group-change counts equal the reference: 16-byte loads where both masks are 16-byte
    aligned, single bytes where one is not (offset), a tail past the last whole 16 bytes, sizes
    that leave partial warps and blocks (the reductions then sum threads that had nothing) and
    span several blocks, and grid-stride loops (max_grid)."""
    gen = torch.Generator().manual_seed(m)
    emu.configure(max_grid=max_grid)
    one_bit = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    for nbytes in [1, 7, 16, 33, 256, 1000, 5003, 70001]:
        base_a = torch.randint(0, 256, (nbytes + 16,), generator=gen, dtype=torch.uint8)
        base_b = base_a.clone()
        a = base_a[offset : offset + nbytes]
        for p in (0.0, 0.3, 1.0):
            # Bytes differ with probability p: by one bit (any of the 8) or by a random pattern.
            single = one_bit[torch.randint(0, 8, (nbytes,), generator=gen)]
            pattern = torch.randint(1, 256, (nbytes,), generator=gen, dtype=torch.uint8)
            pick = torch.rand(nbytes, generator=gen)
            zero = torch.zeros((), dtype=torch.uint8)
            b = base_b[:nbytes]  # b aligned: the path follows a's offset
            b.copy_(a ^ torch.where(pick < p / 2, single, torch.where(pick < p, pattern, zero)))
            out = Guarded((1,), torch.int64)
            out.t.zero_()  # zeroed by the caller
            rc = emu.call("emu_mask_flips", a.data_ptr(), b.data_ptr(), nbytes, m, out.ptr)
            assert rc == CUDA_SUCCESS
            out.check("out")
            want = int(reference.mask_flips(a, b, m))
            assert int(out.t.item()) == want, f"nbytes={nbytes} p={p}"
            aligned = a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
            assert aligned == (offset == 0)
            blocks = flips_grid(nbytes, aligned)
            blocks = min(blocks, max_grid) if max_grid else blocks
            assert emu.grids() == [blocks]
            assert emu.stats()["warp_syncs"] == blocks * (THREADS // 32) * 5 * 2
            assert emu.stats()["barriers"] == blocks
    assert emu.call("emu_mask_flips", None, None, 0, m, None) == CUDA_SUCCESS


# ---- fp16 / bf16 conversions of the stubs ------------------------------------------------------


def test_stub_conversions(emu_lib: Emu) -> None:
    """The stubs' __half2float / __bfloat162float are exact on all 65536 bit patterns, and
    __float2half_rn / __float2bfloat16_rn round to nearest even as torch does, on every value
    and halfway point between neighbours, random fp32 bit patterns, overflow and subnormals (NaN
    in: the device's canonical 0x7FFF out)."""
    lib = emu_lib.lib
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("float2half_rn", "half2float", "float2bfloat16_rn", "bfloat162float"):
        getattr(lib, f"emu_{name}").argtypes = [vp, i64, vp]
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    gen = torch.Generator().manual_seed(2)
    random_f32 = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    random_f32 = random_f32.to(torch.int32).view(torch.float32)
    for dtype, to_f, from_f in (
        (torch.float16, lib.emu_half2float, lib.emu_float2half_rn),
        (torch.bfloat16, lib.emu_bfloat162float, lib.emu_float2bfloat16_rn),
    ):
        values = every.view(dtype)
        got = torch.empty(values.shape, dtype=torch.float32)
        to_f(every.data_ptr(), every.numel(), got.data_ptr())
        assert_bits_equal(got, values.float(), f"{dtype} to float")
        wide = values.float()
        finite = wide[torch.isfinite(wide)].unique()
        mids = (finite[:-1].double() + finite[1:].double()) / 2  # halfway: ties to even
        x = torch.cat([wide, mids.float(), random_f32, torch.tensor([1e30, -1e30, 1e-45])])
        out = torch.empty(x.shape, dtype=torch.int16)
        from_f(x.data_ptr(), x.numel(), out.data_ptr())
        nan = torch.isnan(x)
        assert bool((out[nan] == 0x7FFF).all()), f"{dtype}: NaN must become 0x7FFF"
        assert_bits_equal(out[~nan], bits(x[~nan].to(dtype)), f"float to {dtype}")


# ---- adams_step --------------------------------------------------------------------------------

HP = dict(ADAMS_HP)


# Tensor i of every list has its `key` buffer (only that one) one element past a 64-byte
# boundary, on a shape that would otherwise take 16-byte vector access: the launcher must see it
# and go scalar (the emulator faults on a misaligned vector access).
MISALIGNED = {"params": 4, "grads": 5, "exp_avgs": 6, "exp_avg_sqs": 7, "masters": 8}


def adams_shapes(sparse: bool, m: int) -> list[tuple[int, ...]]:
    """40 tensors (two update launches of at most 36): three cut into several 2048-unit chunks
    (one with a chunk boundary inside a row, one single-row), an empty one, five vectorisable
    ones (MISALIGNED), and small ones of every row class."""
    if not sparse:
        big = [(40001,), (2, 9000), (16384,)]
        vec = [(16,), (2, 8), (64,), (3, 16), (40,)]
        small = [(), (7,), (3, 5), (1,), (2, 8), (4, 12), (9,), (16,)]
        empty = [(0,)]
    elif m == 4:
        big = [(9, 2052), (1, 20004), (2, 8192)]
        vec = [(4, 16), (2, 8), (1, 64), (3, 24), (5, 8)]
        small = [(1, 4), (3, 12), (5, 36), (2, 8), (4, 16), (1, 64), (3, 4), (2, 20)]
        empty = [(0, 4)]
    else:
        big = [(9, 2048), (1, 16392), (2, 8192)]
        vec = [(4, 16), (2, 8), (1, 64), (3, 24), (5, 8)]
        small = [(1, 8), (3, 16), (2, 24), (5, 8), (1, 64), (4, 40)]
        empty = [(0, 8)]
    shapes = big + empty + vec
    while len(shapes) < 40:
        shapes.append(small[len(shapes) % len(small)])
    return shapes


def misaligned(t: Tensor) -> Tensor:
    """A contiguous copy of t whose data starts one element past a 64-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def make_adams_lists(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, sparse: bool, master: bool, seed: int
) -> dict[str, list[Tensor]]:
    """Params and state as after a few steps; per-tensor steps 0..4 (so one launch mixes tensors
    that refresh and tensors that do not, at different alpha); random stale masks; the buffers
    of MISALIGNED misaligned."""
    gen = torch.Generator().manual_seed(seed)
    d: dict[str, list[Tensor]] = {key: [] for key in ADAMS_LIST_KEYS}
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=gen) * 0.02
        d["params"].append(w.to(dtype))
        d["grads"].append((torch.randn(shape, generator=gen) * 1e-3).to(dtype))
        d["exp_avgs"].append(torch.randn(shape, generator=gen) * 1e-3)
        d["exp_avg_sqs"].append(torch.rand(shape, generator=gen) * 1e-6)
        d["steps"].append(torch.tensor(float(i % 5)))
        if master:
            d["masters"].append(w.clone())
        if sparse:
            mshape = (*shape[:-1], (shape[-1] + 7) // 8)
            d["masks"].append(torch.randint(0, 256, mshape, generator=gen, dtype=torch.uint8))
            d["prev"].append(torch.full(mshape, 7, dtype=torch.uint8))
    for key, i in MISALIGNED.items():
        if d[key] and i < len(shapes):
            d[key][i] = misaligned(d[key][i])
    return d


def subset(d: dict[str, list[Tensor]], idx: list[int]) -> dict[str, list[Tensor]]:
    """The same tensors (not copies) of the lists' entries idx."""
    return {key: [ts[i] for i in idx] if ts else [] for key, ts in d.items()}


def run_emu_adams(
    emu: Emu,
    d: dict[str, list[Tensor]],
    hp: dict[str, float],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    num_sms: int,
) -> int:
    """adams_step as csrc/cuda/adams_cuda.cpp calls it (dense lists: one row of numel)."""
    sparse, master = bool(d["masks"]), bool(d["masters"])
    table = []
    for i, p in enumerate(d["params"]):
        k = p.shape[-1] if sparse else p.numel()
        rows = 0 if k == 0 else p.numel() // k
        ptrs = [
            p.data_ptr(),
            d["grads"][i].data_ptr(),
            d["exp_avgs"][i].data_ptr(),
            d["exp_avg_sqs"][i].data_ptr(),
            d["masks"][i].data_ptr() if sparse else 0,
            d["prev"][i].data_ptr() if d["prev"] else 0,
            d["masters"][i].data_ptr() if master else 0,
            d["steps"][i].data_ptr(),
        ]
        table.append([*ptrs, rows, k])
    tab = torch.tensor(table, dtype=torch.int64)
    hyper_d = torch.tensor(
        [hp[key] for key in ("lr", "beta1", "beta2", "eps", "weight_decay", "decay")],
        dtype=torch.float64,  # Python floats, as the op schema hands them over
    )
    hyper_i = torch.tensor([hp["total_steps"], hp["mask_interval"], hp["n"], hp["m"]])
    return emu.call(
        "emu_adams_step",
        DTYPE_CODE[d["params"][0].dtype],
        int(master),
        int(sparse),
        tab.data_ptr(),
        len(table),
        hyper_d.data_ptr(),
        hyper_i.data_ptr(),
        grad_scale.data_ptr() if grad_scale is not None else None,
        found_inf.data_ptr() if found_inf is not None else None,
        num_sms,
    )


def call_adams(
    fn: Callable[..., None], d: dict[str, list[Tensor]], hp: dict[str, float], **kw: Tensor
) -> None:
    fn(*adams_args(d), **hp, **kw)


# (dtype, sparse, master, n, m, num_sms, schedule): num_sms 1 gives 8 blocks (the emulator's
# occupancy), so each block strides over chunks of different tensors (the shared coefficients
# change between chunks);
# schedules 0 and 1 run the threads between barriers in opposite orders (thread 0 first catches a
# missing barrier after the shared read, thread 0 last one before it), 2 in a random order, 3 warp
# by warp with the last warp running ahead.
ADAMS_CASES = {
    "fp32-sparse-2:4": (torch.float32, True, False, 2, 4, 1, 0),
    "fp32-sparse-2:4-desc": (torch.float32, True, False, 2, 4, 1, 1),
    "bf16-master-sparse-2:4": (torch.bfloat16, True, True, 2, 4, 1, 2),
    "fp16-master-sparse-1:4": (torch.float16, True, True, 1, 4, 132, 1),
    "fp32-master-sparse-4:8": (torch.float32, True, True, 4, 8, 2, 0),
    "fp32-dense": (torch.float32, False, False, 2, 4, 1, 1),
    "fp16-master-dense": (torch.float16, False, True, 2, 4, 3, 0),
    "bf16-master-dense": (torch.bfloat16, False, True, 2, 4, 1, 2),
    "bf16-master-sparse-2:4-warps": (torch.bfloat16, True, True, 2, 4, 1, 3),
    "fp32-dense-warps": (torch.float32, False, False, 2, 4, 2, 3),
}


@pytest.mark.parametrize("case", list(ADAMS_CASES))
def test_adams_step(emu: Emu, case: str) -> None:
    """Ten steps of the emulated adams_step equal the CPU kernel bit for bit (every param, master,
    moment, mask, prev mask and step) and the reference to tests/test_adams.py's tolerance.

    Steps start at 0..4 per tensor and cross refreshes (mask_interval 3) and total_steps 7; one
    step in four divides by a grad_scale; one step has found_inf = 1 (nothing may change, steps
    included) and one found_inf = 0 (a normal step). Launch count and grid sizes are asserted.
    """
    dtype, sparse, master, n, m, num_sms, schedule = ADAMS_CASES[case]
    emu.configure(schedule=schedule, seed=12345)
    hp = {**HP, "n": n, "m": m}
    shapes = adams_shapes(sparse, m)
    emu_d = make_adams_lists(shapes, dtype, sparse, master, seed=len(case))
    cpu_d = clone_lists(emu_d)
    # The reference cannot unpack the mask of an empty sparse tensor (reshape(0, -1) is
    # ambiguous): it gets the others, and the empty one is compared with the CPU kernel only.
    in_ref = [i for i, s in enumerate(shapes) if not sparse or math.prod(s) > 0]
    ref_d = subset(clone_lists(emu_d), in_ref)
    gen = torch.Generator().manual_seed(99)
    for it in range(10):
        for i, shape in enumerate(shapes):
            g = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
            for d in (emu_d, cpu_d):
                d["grads"][i].copy_(g)
        for i, j in enumerate(in_ref):
            ref_d["grads"][i].copy_(emu_d["grads"][j])
        kw: dict[str, Tensor] = {}
        if it % 4 == 1:
            kw["grad_scale"] = torch.tensor([512.0])
        if it in (5, 6):
            kw["found_inf"] = torch.tensor([1.0 if it == 5 else 0.0])
        before = clone_lists(emu_d) if it == 5 else None
        rc = run_emu_adams(
            emu, emu_d, hp, kw.get("grad_scale"), kw.get("found_inf"), num_sms=num_sms
        )
        assert rc == CUDA_SUCCESS
        nonempty = sum(1 for s in shapes if math.prod(s) > 0)
        grids = emu.grids()
        assert len(grids) == -(-nonempty // 36) + 1, grids  # update launches, then the steps
        assert all(1 <= g <= num_sms * 8 for g in grids[:-1]) and grids[-1] == 1, grids
        # Two barriers per chunk a block takes; found_inf returns before the first one.
        assert (emu.stats()["barriers"] == 0) == (it == 5)
        call_adams(cast_ext.ops.adams_step_, cpu_d, hp, **kw)
        call_adams(reference.adams_step_, ref_d, hp, **kw)
        if before is not None:
            for key in ADAMS_LIST_KEYS:
                for x, y in zip(emu_d[key], before[key], strict=True):
                    assert_bits_equal(x, y, f"found_inf: {key} changed")
        for key in ADAMS_LIST_KEYS:
            for i, (x, y) in enumerate(zip(emu_d[key], cpu_d[key], strict=True)):
                assert_bits_equal(x, y, f"step {it}: {key}[{i}] {list(x.shape)} vs CPU kernel")
        assert_adams_state_close(subset(emu_d, in_ref), ref_d)
    assert [float(s) for s in emu_d["steps"]] == [float(i % 5 + 9) for i in range(len(shapes))]


@PROPERTY
@given(
    shapes=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 40)), min_size=1, max_size=6),
    kind=st.sampled_from(["fp32", "fp32-master", "bf16-master", "fp16-master"]),
    sparse=st.booleans(),
    nm=st.sampled_from(NM),
    lr=st.sampled_from([0.0, 1e-4, 3e-2]),
    betas=st.sampled_from([(0.0, 0.0), (0.9, 0.95), (0.5, 0.999)]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    decay=st.sampled_from([0.0, 4e-7, 1e-2]),
    total_steps=st.integers(1, 6),
    mask_interval=st.integers(1, 4),
    first_step=st.integers(0, 8),
    seed=st.integers(0, 2**16),
    schedule=st.sampled_from(SCHEDULES),
)
def test_adams_step_property(
    emu_lib: Emu, shapes: list[tuple[int, int]], kind: str, sparse: bool, nm: tuple[int, int],
    lr: float, betas: tuple[float, float], weight_decay: float, decay: float, total_steps: int,
    mask_interval: int, first_step: int, seed: int, schedule: int,
) -> None:  # fmt: skip
    """Any shapes (rows 0-9, groups 1-40), dtype/master, sparse or dense, N:M and
    hyperparameters (betas of 0, lr 0, steps before, at and past total_steps and refreshes):
    three emulated steps equal the CPU kernel bit for bit."""
    n, m = nm
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind[:4]]
    master = kind.endswith("master")
    emu_lib.configure(schedule=schedule, seed=seed)
    shapes_ = [(r, g * m) for r, g in shapes]
    emu_d = make_adams_lists(shapes_, dtype, sparse, master, seed=seed)
    emu_d = {key: [t.contiguous() for t in ts] for key, ts in emu_d.items()}
    for i, st_ in enumerate(emu_d["steps"]):
        st_.fill_(float(first_step + i))
    cpu_d = clone_lists(emu_d)
    hp = {
        "lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": 1e-8, "weight_decay": weight_decay,
        "decay": decay, "total_steps": total_steps, "mask_interval": mask_interval, "n": n, "m": m,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    for it in range(3):
        for i, shape in enumerate(shapes_):
            g = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
            emu_d["grads"][i].copy_(g)
            cpu_d["grads"][i].copy_(g)
        assert run_emu_adams(emu_lib, emu_d, hp, None, None, num_sms=1) == CUDA_SUCCESS
        call_adams(cast_ext.ops.adams_step_, cpu_d, hp)
        for key in ADAMS_LIST_KEYS:
            for i, (x, y) in enumerate(zip(emu_d[key], cpu_d[key], strict=True)):
                assert_bits_equal(x, y, f"step {it}: {key}[{i}] {list(x.shape)} vs CPU kernel")
    emu_lib.configure()


def test_adams_step_grid_is_one_wave_of_resident_blocks(emu: Emu) -> None:
    """The update grid is the SMs times the blocks the occupancy query says fit (fewer when
    there are fewer chunks), one block a SM if the query fails; the values do not depend on it."""
    shapes = [(64, 2048), (8, 16)]  # 8 chunks of 2048 units, and one
    hp = {**HP, "n": 2, "m": 4}
    results = []
    for occupancy, want in ((3, [6, 1]), (8, [9, 1]), (0, [2, 1])):
        emu.configure(occupancy=occupancy)
        d = make_adams_lists(shapes, torch.float32, True, False, seed=5)
        assert run_emu_adams(emu, d, hp, None, None, num_sms=2) == CUDA_SUCCESS
        assert emu.grids() == want, occupancy
        results.append(d)
    emu.configure()
    for d in results[1:]:
        for key in ADAMS_LIST_KEYS:
            for x, y in zip(d[key], results[0][key], strict=True):
                assert_bits_equal(x, y, key)


def test_adams_step_many_tensors(emu: Emu) -> None:
    """Over 400 tensors: 12 update launches and two step-count launches (at most 400 steps each),
    every step incremented once; values bit for bit against the CPU kernel."""
    shapes = [(1 + i % 11,) for i in range(401)]
    emu_d = make_adams_lists(shapes, torch.float32, False, False, seed=4)
    cpu_d = clone_lists(emu_d)
    hp = {**HP, "n": 2, "m": 4}
    for _ in range(2):
        assert run_emu_adams(emu, emu_d, hp, None, None, num_sms=4) == CUDA_SUCCESS
        assert len(emu.grids()) == 12 + 2
        call_adams(cast_ext.ops.adams_step_, cpu_d, hp)
        for key in ADAMS_LIST_KEYS:
            for i, (x, y) in enumerate(zip(emu_d[key], cpu_d[key], strict=True)):
                assert_bits_equal(x, y, f"{key}[{i}] vs CPU kernel")
    assert all(float(s) == i % 5 + 2 for i, s in enumerate(emu_d["steps"]))


def test_adams_step_zero_weights_decay_by_sign_zero(emu: Emu) -> None:
    """Weights exactly ±0 (zero-initialised layers, pruned entries that reached 0): a pruned
    zero's decayed moment is (1 - alpha) mu + alpha decay sign(0) with sign(0) = 0, as torch.sign
    and the CPU kernel have it (a sign of +1 at 0, ``w >= 0 ? 1 : -1``, passed every other test:
    their random weights are never 0). Bit for bit against the CPU kernel, fp32 and bf16-master,
    at steps past 0 (alpha > 0) with and without a refresh."""
    for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
        hp = {**HP, "n": 2, "m": 4, "decay": 1e-2}
        shapes = [(4, 24), (3, 12), (2, 16)]
        d = make_adams_lists(shapes, dtype, True, master, seed=17)
        d = {key: [t.contiguous() for t in ts] for key, ts in d.items()}
        for i, p in enumerate(d["params"]):
            zero = torch.zeros(p.shape, dtype=torch.bool)
            zero.view(-1)[i % 2 :: 2] = True  # every other weight 0, half of them -0.0
            signed = torch.where(torch.rand(p.shape) < 0.5, -0.0, 0.0)
            p.copy_(torch.where(zero, signed.to(dtype), p))
            if master:
                d["masters"][i].copy_(torch.where(zero, signed, d["masters"][i]))
            d["steps"][i].fill_(float(i + 1))  # 1, 2, 3: alpha > 0; step 3 refreshes
        cpu_d = clone_lists(d)
        for it in range(2):
            rc = run_emu_adams(emu, d, hp, None, None, num_sms=1)
            assert rc == CUDA_SUCCESS
            call_adams(cast_ext.ops.adams_step_, cpu_d, hp)
            for key in ADAMS_LIST_KEYS:
                for i, (x, y) in enumerate(zip(d[key], cpu_d[key], strict=True)):
                    assert_bits_equal(x, y, f"{dtype} step {it}: {key}[{i}] vs CPU kernel")


def test_adams_step_writes_nothing_past_a_tensor(emu: Emu) -> None:
    """Every param, moment and master of a step lives in a guarded buffer: tensors whose last unit
    is short (a dense tensor of 7, 12 or 41 elements, rows of 12 or 20) take vector access for the
    full units only, and nothing is written past any tensor's end. (A vector store of the short
    last unit wrote past it and only crashed the test process now and then, by heap corruption.)"""
    for sparse, shapes in (
        (False, [(7,), (12,), (41,), (3, 5)]),
        (True, [(1, 12), (2, 20), (3, 12)]),
    ):
        for dtype, master in ((torch.float32, False), (torch.float16, True)):
            hp = {**HP, "n": 2, "m": 4}
            d = make_adams_lists(shapes, dtype, sparse, master, seed=23)
            guards: list[tuple[str, Guarded]] = []
            for key in ("params", "exp_avgs", "exp_avg_sqs", "masters", "masks", "prev"):
                for i, t in enumerate(d[key]):
                    g = Guarded(tuple(t.shape), t.dtype)
                    g.t.copy_(t)
                    d[key][i] = g.t
                    guards.append((f"{key}[{i}]", g))
            cpu_d = clone_lists(d)
            for _ in range(2):
                assert run_emu_adams(emu, d, hp, None, None, num_sms=1) == CUDA_SUCCESS
                call_adams(cast_ext.ops.adams_step_, cpu_d, hp)
                for what, g in guards:
                    g.check(f"{dtype} sparse={sparse} {what}")
                for key in ADAMS_LIST_KEYS:
                    for i, (x, y) in enumerate(zip(d[key], cpu_d[key], strict=True)):
                        assert_bits_equal(x, y, f"{key}[{i}] vs CPU kernel")


# ---- sparse24_gemv (the packed small-M GEMM) ---------------------------------------------------

GEMV_SHAPES = [
    (1, 8, 16),
    (3, 24, 64),
    (16, 12, 1040),
    (5, 9, 32),
    (2, 1, 16),
    (7, 33, 528),
    (2, 5, 4800),
    (16, 20, 256),
    (9, 40, 96),
    (12, 17, 1024),
]
"""(M, N, K): one chunk per row; several; 65 chunks (uneven across the 32 lanes) with the largest
M; N not a multiple of the 8 rows a block takes; a single row; 33 chunks; 300 chunks (three
passes of a lane's 4-chunk batches, the last one partial). For the tensor-core kernel (fp16/bf16,
M >= 2, K % 32 == 0): 150 32-column steps (19 a warp, its last 4-step batch partial); two
8-token tiles, the second full, N not a multiple of its 16 rows a block; 9 tokens (the second
tile nearly empty), 3 steps (5 of the 8 warps with none); 32 steps, 17 rows (a block of one)."""


def uses_tensor_cores(dtype: torch.dtype, m: int, k: int, tensor_cores: bool) -> bool:
    """Whether sparse24_gemv takes its tensor-core kernel (sparse24_gemv.cu's uses_tensor_cores,
    with an aligned meta)."""
    return tensor_cores and dtype != torch.float32 and 2 <= m <= 16 and k % 32 == 0


def gemv_grid(dtype: torch.dtype, m: int, n: int, k: int, tensor_cores: bool) -> int:
    """The launch's gridDim.x: 16 rows a block on tensor cores, else 8."""
    return (n + 15) // 16 if uses_tensor_cores(dtype, m, k, tensor_cores) else (n + 7) // 8


def run_gemv(
    emu: Emu,
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    bias: Tensor | None,
    null_flag: bool = False,
    tensor_cores: bool = False,
) -> tuple[int, Tensor, int]:
    """sparse24_gemv on a device with (``tensor_cores``, sm80+) or without them."""
    m, k = x.shape
    n = values.shape[0]
    y = Guarded((m, n), x.dtype)
    b = None if bias is None else bias.data_ptr()
    args = (DTYPE_CODE[x.dtype], x.data_ptr(), values.data_ptr(), meta.data_ptr(), b, m, n, k)
    args += (y.ptr, int(tensor_cores))
    rc, bad = call_flagged(emu, "emu_sparse24_gemv", args, {"y": y}, "bad_meta", null_flag)
    return rc, y.t, bad


def assert_gemm_close(y: Tensor, x: Tensor, w: Tensor, b: Tensor | None, what: str) -> None:
    """Within the dtype's output rounding plus fp32 accumulation over K, relative to the GEMM's own
    scale |x| @ |W|^T + |b| (the bound of tests/conftest.gemm_tol)."""
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    rtol = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    bound = rtol + 2.0 * x.shape[1] * 2.0**-24
    err = float(((y.double() - ref).abs() / (scale + 1e-30)).max())
    assert err <= bound, f"{what}: error {err} > {bound}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "tensor_cores"])
def test_sparse24_gemv(emu: Emu, dtype: torch.dtype, with_bias: bool, tensor_cores: bool) -> None:
    """y = x @ W^T (+ b) for every shape, each thread schedule, on a device with tensor cores
    and without; no flag on valid metadata."""
    gen = torch.Generator().manual_seed(21)
    for m, n, k in GEMV_SHAPES:
        w = reference.sparse24_prune(torch.randn(n, k, generator=gen).to(dtype))
        values, meta = reference.sparse24_compress(w)
        x = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
        for schedule in SCHEDULES:
            emu.configure(schedule=schedule, seed=m)
            rc, y, bad = run_gemv(emu, x, values, meta, b, tensor_cores=tensor_cores)
            assert (rc, bad) == (CUDA_SUCCESS, 0), (m, n, k)
            assert_gemm_close(y, x, w, b, f"[{m}x{k}] @ [{n}x{k}]^T schedule {schedule}")
        assert emu.grids() == [gemv_grid(dtype, m, n, k, tensor_cores)]


@PROPERTY
@given(
    m=st.integers(1, 16),
    n=st.integers(1, 40),
    chunks=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
    schedule=st.sampled_from(SCHEDULES),
    tensor_cores=st.booleans(),
)
def test_sparse24_gemv_property(
    emu_lib: Emu, m: int, n: int, chunks: int, dtype: torch.dtype, with_bias: bool, seed: int,
    schedule: int, tensor_cores: bool,
) -> None:  # fmt: skip
    """Any M <= 16, N, K = 16 * chunks, dtype, bias, thread schedule and device (tensor cores
    or not): y = x @ W^T (+ b) within the GEMM bound, no flag on valid metadata."""
    emu_lib.configure(schedule=schedule, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    k = 16 * chunks
    w = reference.sparse24_prune(torch.randn(n, k, generator=gen).to(dtype))
    values, meta = reference.sparse24_compress(w)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    rc, y, bad = run_gemv(emu_lib, x, values, meta, b, tensor_cores=tensor_cores)
    assert (rc, bad) == (CUDA_SUCCESS, 0)
    assert_gemm_close(y, x, w, b, f"[{m}x{k}] @ [{n}x{k}]^T")
    assert emu_lib.grids() == [gemv_grid(dtype, m, n, k, tensor_cores)]
    emu_lib.configure()


@pytest.mark.parametrize(
    "dtype,tensor_cores",
    [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)],
    ids=["fp32", "bf16-tensor-cores", "fp16-tensor-cores"],
)
def test_sparse24_gemv_every_m_and_invalid_meta(
    emu: Emu, dtype: torch.dtype, tensor_cores: bool
) -> None:
    """Every M from 1 to 16 (each template width, partially filled); then a corrupted group in
    each of the 4 positions of a 16-column chunk (the tensor-core kernel's lanes split a chunk's
    groups): ``bad_meta`` is raised and the group contributes zeros, the rest is unchanged."""
    gen = torch.Generator().manual_seed(22)
    n, k = 16, 96
    w = reference.sparse24_prune(torch.randn(n, k, generator=gen).to(dtype))
    values, meta = reference.sparse24_compress(w)
    for m in range(1, 17):
        x = torch.randn(m, k, generator=gen).to(dtype)
        rc, y, bad = run_gemv(emu, x, values, meta, None, tensor_cores=tensor_cores)
        assert (rc, bad) == (CUDA_SUCCESS, 0), m
        assert_gemm_close(y, x, w, None, f"m={m}")
        assert emu.grids() == [gemv_grid(dtype, m, n, k, tensor_cores)]
    for row, group in ((5, 6), (12, 1), (0, 8), (15, 19)):  # positions 2, 1, 0, 3 in a chunk
        corrupt = meta.clone()
        byte, shift = divmod(group, 2)
        corrupt[row, byte] = (corrupt[row, byte] & (0xF0 >> 4 * shift)) | (0x7 << 4 * shift)
        w_bad = w.clone()
        w_bad[row, 4 * group : 4 * group + 4] = 0.0  # keeps 3: the group reads as zeros
        x = torch.randn(4, k, generator=gen).to(dtype)
        rc, y, bad = run_gemv(emu, x, values, corrupt, None, tensor_cores=tensor_cores)
        assert (rc, bad) == (CUDA_SUCCESS, 1), (row, group)
        assert_gemm_close(y, x, w_bad, None, f"invalid group {group} of row {row}")


def test_sparse24_gemv_refuses_what_it_cannot_run(emu: Emu) -> None:
    """M over the limit, K not a multiple of 16 and misaligned x are refused with
    cudaErrorInvalidValue before any launch (the glue then takes decompress + GEMM); M = 0 does
    nothing."""
    values, meta = reference.sparse24_compress(reference.sparse24_prune(torch.randn(8, 32)))
    x = torch.randn(17, 32)
    assert run_gemv(emu, x, values, meta, None)[0] == CUDA_INVALID_VALUE
    assert emu.stats()["launches"] == 0
    v24, m24 = reference.sparse24_compress(reference.sparse24_prune(torch.randn(8, 24)))
    assert run_gemv(emu, torch.randn(2, 24), v24, m24, None)[0] == CUDA_INVALID_VALUE
    shifted = torch.randn(2 * 32 + 1)[1:].view(2, 32)  # 4 bytes past a 16-byte boundary
    assert run_gemv(emu, shifted, values, meta, None)[0] == CUDA_INVALID_VALUE
    rc, _, bad = run_gemv(emu, torch.randn(0, 32), values, meta, None)
    assert (rc, bad, emu.stats()["launches"]) == (CUDA_SUCCESS, 0, 0)


def test_sparse24_gemv_rounds_once_with_bias(emu: Emu) -> None:
    """Small-integer x and W make every fp32 partial sum exact in any order, so y must equal
    (x @ W^T + b) rounded once to T, bit for bit; biases of k + 0.5 put the exact result halfway
    or off-halfway where a rounding of x @ W^T before the bias is added lands elsewhere (257 + 0.5
    in bf16: 258 once, 256 twice). assert_gemm_close's tolerance let such a double rounding pass."""
    gen = torch.Generator().manual_seed(24)
    for dtype, tensor_cores in itertools.product(
        (torch.float16, torch.bfloat16, torch.float32), (False, True)
    ):
        for m, n, k in ((1, 16, 1040), (5, 24, 64), (16, 9, 528), (12, 20, 256)):
            w = torch.randint(-3, 4, (n, k), generator=gen).to(dtype)
            w = reference.sparse24_prune(w)
            values, meta = reference.sparse24_compress(w)
            x = torch.randint(-3, 4, (m, k), generator=gen).to(dtype)
            acc = x.double() @ w.double().t()
            b = (torch.randint(-40, 41, (n,), generator=gen).double() + 0.5).to(dtype)
            for bias in (None, b):
                exact = acc if bias is None else acc + bias.double()
                rc, y, bad = run_gemv(emu, x, values, meta, bias, tensor_cores=tensor_cores)
                assert (rc, bad) == (CUDA_SUCCESS, 0)
                assert_bits_equal(y, exact.to(dtype), f"{dtype} [{m}x{k}] @ [{n}x{k}]^T")
    # the halfway case itself: 257 + 0.5 = 257.5 -> 258 in bf16 (257 alone rounds to even 256)
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    x[0, 0], x[0, 1] = 256.0, 1.0
    w = torch.zeros(1, 16, dtype=torch.bfloat16)
    w[0, 0] = w[0, 1] = 1.0
    values, meta = reference.sparse24_compress(w)
    rc, y, _ = run_gemv(emu, x, values, meta, torch.tensor([0.5], dtype=torch.bfloat16))
    assert rc == CUDA_SUCCESS and float(y) == 258.0, float(y)


def test_sparse24_gemv_refuses_misaligned_operands(emu: Emu) -> None:
    """Every alignment sparse24_gemv_supported demands is checked before a launch: values (16
    bytes, fp16 and fp32), meta (2 bytes: the kernel reads two meta bytes as one uint16), bias
    and y (2 bytes). The emulator faults only on misaligned 8/16-byte vectors, so a dropped meta,
    bias or y check ran here unnoticed, and the device would fault on the uint16 meta load."""
    for dtype in (torch.float16, torch.float32):
        n, k, m = 8, 32, 2
        w = reference.sparse24_prune(torch.randn(n, k).to(dtype))
        values, meta = reference.sparse24_compress(w)
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n).to(dtype)

        def shifted(t: Tensor, nbytes: int) -> Tensor:  # a byte copy of t, nbytes past 64
            raw = torch.zeros(t.numel() * t.element_size() + 64 + nbytes, dtype=torch.uint8)
            out = raw[64 + nbytes : 64 + nbytes + t.numel() * t.element_size()]
            out.copy_(t.contiguous().view(-1).view(torch.uint8))
            return out

        y = torch.empty(m * n * dtype.itemsize + 65, dtype=torch.uint8)
        ok = (values.data_ptr(), meta.data_ptr(), bias.data_ptr(), y.data_ptr() + 64)
        bad = {
            "values": shifted(values, dtype.itemsize).data_ptr(),
            "meta": shifted(meta, 1).data_ptr(),
            "bias": shifted(bias, 1).data_ptr(),
            "y": y.data_ptr() + 65,
        }
        for name in (None, *bad):
            v, mt, b, yp = (
                bad.get(key, p) if key == name else p
                for key, p in zip(("values", "meta", "bias", "y"), ok, strict=True)
            )
            flag = torch.zeros(1, dtype=torch.int32)
            args = (DTYPE_CODE[dtype], x.data_ptr(), v, mt, b, m, n, k, yp, 0, flag.data_ptr())
            rc = emu.call("emu_sparse24_gemv", *args)
            want = CUDA_SUCCESS if name is None else CUDA_INVALID_VALUE
            assert (rc, emu.stats()["launches"]) == (want, int(name is None)), (dtype, name)
    # the tensor-core kernel reads 4 meta bytes at a time: a meta aligned to 2 bytes, not 4,
    # takes the SIMT kernel (8 rows a block), with the same result
    n, k, m = 8, 64, 3
    w = reference.sparse24_prune(torch.randn(n, k).to(torch.bfloat16))
    values, meta = reference.sparse24_compress(w)
    raw = torch.zeros(meta.numel() + 66, dtype=torch.uint8)
    meta2 = raw[66 : 66 + meta.numel()].view(n, k // 8)  # 2 bytes past a 64-byte boundary
    meta2.copy_(meta)
    x = torch.randn(m, k).to(torch.bfloat16)
    rc, y, bad = run_gemv(emu, x, values, meta2, None, tensor_cores=True)
    assert (rc, bad, emu.grids()) == (CUDA_SUCCESS, 0, [1])
    assert_gemm_close(y, x, w, None, "meta aligned to 2 bytes")


# ---- distill_fwd / distill_bwd -----------------------------------------------------------------

# (rows, vocab): one element; a row shorter than a warp; rows longer than one pass of the block
# (512 threads x 4 loads = 2048 elements); more rows than the grid (num_sms = 1: 4 blocks).
DISTILL_SHAPES = [(1, 1), (3, 7), (2, 2049), (9, 300)]


def run_distill_fwd(
    emu: Emu, s: Tensor, t: Tensor | None, y: Tensor, temp: float, null_flag: bool = False
) -> tuple[int, tuple[Tensor, Tensor, Tensor], int]:
    rows, vocab = s.shape
    outs = {
        "kl": Guarded((rows,), torch.float32),
        "ce": Guarded((rows,), torch.float32),
        "lse": Guarded((rows, 3), torch.float32),
    }
    args = (DTYPE_CODE[s.dtype], s.data_ptr(), None if t is None else t.data_ptr(), y.data_ptr())
    args += (rows, vocab, temp, -100, outs["kl"].ptr, outs["ce"].ptr, outs["lse"].ptr, 1)
    rc, bad = call_flagged(emu, "emu_distill_fwd", args, outs, "bad_label", null_flag)
    return rc, (outs["kl"].t, outs["ce"].t, outs["lse"].t), bad


def run_distill_bwd(
    emu: Emu, s: Tensor, t: Tensor | None, y: Tensor, lse: Tensor, scale: float, eta: float,
    temp: float,
) -> tuple[int, Tensor]:  # fmt: skip
    grad = Guarded(tuple(s.shape), s.dtype)
    gs = torch.tensor([scale], dtype=torch.float32)
    args = (DTYPE_CODE[s.dtype], s.data_ptr(), None if t is None else t.data_ptr(), y.data_ptr())
    args += (lse.data_ptr(), gs.data_ptr(), *s.shape, eta, temp, -100, grad.ptr, 1)
    rc = emu.call("emu_distill_bwd", *args)
    grad.check("grad")
    return rc, grad.t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("teacher", [True, False], ids=["kl+ce", "ce"])
def test_distill(emu: Emu, dtype: torch.dtype, temp: float, teacher: bool) -> None:
    """Forward terms and gradient against the reference (fp32 math, other summation order: to
    fp32 rounding), every thread schedule; the grid-stride loop over rows; no flag."""
    eta = 0.3 if teacher else 0.0
    for rows, vocab in DISTILL_SHAPES:
        s, t, y = distill_inputs(rows, vocab, dtype, seed=rows)
        t = t if teacher else None
        want = reference.distill_fwd(s, t, y, temp)
        want_g = reference.distill_bwd(s, t, y, want[2], torch.tensor(0.7), eta, temp)
        for schedule in SCHEDULES:
            emu.configure(schedule=schedule, seed=rows)
            rc, got, bad = run_distill_fwd(emu, s, t, y, temp)
            what = f"[{rows}x{vocab}] schedule {schedule}"
            assert (rc, bad) == (CUDA_SUCCESS, 0), what
            assert emu.grids() == [min(rows, 4)], what
            for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
                torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"{what} {name}")
            rc, grad = run_distill_bwd(emu, s, t, y, got[2], 0.7, eta, temp)
            assert rc == CUDA_SUCCESS, what
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            torch.testing.assert_close(grad, want_g, atol=tol, rtol=tol, msg=what)
            if rows > 2:
                assert not bool(grad[1].any()), f"{what}: ignored row"


@pytest.mark.parametrize("temp", [1.0, 0.7, 3.0])
def test_distill_gradient_of_peaked_rows(emu: Emu, temp: float) -> None:
    """The backward's exponent s k - lse log2(e) (k = log2(e) / T) was one FMA: s k went in
    exact where lse held max / T rounded, so a row's largest softmax entries were off by about
    |s / T| 2^-24 relative: rows peaked near 1e3 came out 3e-5 (T = 3) and 6e-5 (T = 0.7) from
    the reference in this emulation, which contracts a * b + c as nvcc does (it did not before:
    the old kernel passed). A 1-token vocabulary's gradient is exactly 0."""
    one = torch.tensor([[12345.678]])
    y = torch.tensor([0])
    rc, got, _ = run_distill_fwd(emu, one, -2 * one, y, temp)
    assert rc == CUDA_SUCCESS
    rc, grad = run_distill_bwd(emu, one, -2 * one, y, got[2], 1.0, 0.5, temp)
    assert rc == CUDA_SUCCESS and float(grad.abs().max()) == 0.0
    s, t, y = distill_peaked_inputs()
    want = reference.distill_bwd(
        s, t, y, reference.distill_fwd(s, t, y, temp)[2], torch.tensor(1.0), 0.5, temp
    )
    rc, got, _ = run_distill_fwd(emu, s, t, y, temp)
    assert rc == CUDA_SUCCESS
    rc, grad = run_distill_bwd(emu, s, t, y, got[2], 1.0, 0.5, temp)
    assert rc == CUDA_SUCCESS
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=0)


def test_distill_bad_label_and_same_logits(emu: Emu) -> None:
    """A label outside [0, V) raises the flag and gives a NaN CE on its row only (the same
    outputs with a null flag); a teacher equal to the student gives a KL of exactly 0; logits of
    -inf or finfo.min in both models (a masked vocabulary) add nothing."""
    s, t, y = distill_inputs(5, 100, torch.float32, seed=42)
    y[3] = 100
    rc, got, bad = run_distill_fwd(emu, s, t, y, 1.0)
    assert (rc, bad) == (CUDA_SUCCESS, 1)
    assert math.isnan(float(got[1][3])) and not bool(got[1][[0, 1, 2, 4]].isnan().any())
    rc, got_null, _ = run_distill_fwd(emu, s, t, y, 1.0, null_flag=True)
    assert rc == CUDA_SUCCESS
    for g, n in zip(got, got_null, strict=True):
        assert_bits_equal(n, g, "null flag")
    y[3] = 7
    rc, got, _ = run_distill_fwd(emu, s, s.clone(), y, 1.7)
    assert rc == CUDA_SUCCESS and bool((got[0] == 0).all()), got[0]
    # a masked vocabulary (-inf in both models) equals the unmasked columns alone
    y = torch.where(y == -100, y, y % 90)
    s[:, 90:] = float("-inf")
    t[:, 90:] = float("-inf")
    rc, got, _ = run_distill_fwd(emu, s, t, y, 1.0)
    want = reference.distill_fwd(s[:, :90].contiguous(), t[:, :90].contiguous(), y)
    assert rc == CUDA_SUCCESS
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    # ... and finfo.min means what -inf means, also at T < 1 (where the masked logit over T
    # overflows to -inf): a teacher masked where the student is not (columns 80:90) too
    low = torch.finfo(torch.float32).min
    s_min, t_min = s.clone(), t.clone()
    s_min[:, 90:] = low
    t_min[:, 80:] = low
    t[:, 80:] = float("-inf")
    for temp in (0.5, 1.0, 2.0):
        rc, got, _ = run_distill_fwd(emu, s_min, t_min, y, temp)
        want = reference.distill_fwd(s, t, y, temp)
        assert rc == CUDA_SUCCESS
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"T={temp}")


def test_distill_finite_maxima_whose_difference_overflows(emu: Emu) -> None:
    """Finite row maxima of opposite signs whose difference overflows fp32 (3e38 and -3e38) took
    kl_of's infinite-maxima path and gave KL = -inf (distill_math.h, the CPU kernel's code too);
    a teacher finfo.min entry below a teacher max of 1e32 adds nothing. As the reference."""
    low = torch.finfo(torch.float32).min
    y = torch.tensor([0])
    for s, t in (([[3e38]], [[-3e38]]), ([[3e38, 0.0]], [[-1e38, -2e38]]),
                 ([[0.0, 0.0, 0.0]], [[1e32, 0.0, low]])):  # fmt: skip
        s, t = torch.tensor(s), torch.tensor(t)
        rc, got, _ = run_distill_fwd(emu, s, t, y, 1.0)
        assert rc == CUDA_SUCCESS
        torch.testing.assert_close(got[0], reference.distill_fwd(s, t, y)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distill_teacher_masked_alone_with_finfo_min(emu: Emu, dtype: torch.dtype) -> None:
    """A teacher masked with finfo.min where the student is not: a thread (or a merged pair)
    that had seen masked teacher logits alone summed e (t - s) with e = 1, two of them
    overflowed to -inf, and the rescale by 0 when a real teacher logit came made the row's KL
    NaN (from column 70, 64 or 60 of 100; 80 happened to pair each masked lane with a real one).
    A top-k teacher (50 real logits at random places) too. Equal to the reference with -inf."""
    s, t, y = distill_inputs(5, 100, dtype, seed=7)
    low = torch.finfo(dtype).min
    gen = torch.Generator().manual_seed(3)
    top = torch.rand(5, 100, generator=gen).argsort(dim=-1)[:, :50]
    masks = {f"from-{c}": torch.arange(100).expand(5, 100) >= c for c in (60, 64, 70)}
    masks["top-50"] = torch.ones(5, 100, dtype=torch.bool).scatter(1, top, False)
    for name, masked in masks.items():
        rc, got, _ = run_distill_fwd(emu, s, t.masked_fill(masked, low), y, 1.0)
        want = reference.distill_fwd(s, t.masked_fill(masked, float("-inf")), y, 1.0)
        assert rc == CUDA_SUCCESS
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distill_student_minus_inf(emu: Emu, dtype: torch.dtype) -> None:
    """A student -inf where the teacher's probability is 0 (finfo.min, an underflow) adds
    nothing, whether a thread meets those logits before the row's max or after it; where the
    teacher has mass, the KL is +inf (NaN for a student row all -inf), as in the reference."""
    s, t, y = distill_inputs(5, 2100, dtype, seed=19)
    y = torch.where(y == -100, y, y % 50)  # labels among the 50 real columns
    low = torch.finfo(dtype).min
    for flip in (False, True):  # the 50 real columns first, or last
        s_, t_ = s.clone(), t.clone()
        t_[:, 55:] = low
        t_[:, 50:55] = (t[:, :50].float().amax(-1, keepdim=True) - 200).to(dtype)
        s_[:, 50:] = -math.inf
        yf = y
        if flip:
            s_, t_ = s_.flip(-1).contiguous(), t_.flip(-1).contiguous()
            yf = torch.where(y == -100, y, 2099 - y)
        cut = [x[:, -50:] if flip else x[:, :50] for x in (s_, t_)]
        yc = torch.where(yf == -100, yf, yf - 2050) if flip else y  # in the cut's columns
        want = reference.distill_fwd(*(x.contiguous() for x in cut), yc)
        rc, got, _ = run_distill_fwd(emu, s_, t_, yf, 1.0)
        assert rc == CUDA_SUCCESS
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"flip {flip}")
        col = 2099 - 3 if flip else 3
        s_[:, col] = -math.inf  # teacher mass there
        s_[4] = -math.inf
        want = reference.distill_fwd(s_, t_, yf)
        rc, got, _ = run_distill_fwd(emu, s_, t_, yf, 1.0)
        assert rc == CUDA_SUCCESS
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, equal_nan=True)
        assert bool(got[0][[0, 2, 3]].eq(math.inf).all() and got[0][4].isnan())


@PROPERTY
@given(
    rows=st.integers(1, 3),
    vocab=st.one_of(st.integers(1, 300), st.integers(2040, 4200)),  # 1 or 2+ chunks a thread
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    temp=st.sampled_from([0.5, 1.0, 2.0]),
    density=st.floats(0.0, 1.0),
    fills=st.tuples(st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
    schedule=st.sampled_from(SCHEDULES),
)
def test_distill_masked_teacher_property(
    emu_lib: Emu, rows: int, vocab: int, dtype: torch.dtype, temp: float, density: float,
    fills: tuple[bool, bool], seed: int, schedule: int,
) -> None:  # fmt: skip
    """Teachers masked at random places (any density, each row keeping one real logit), and the
    student masked at some of the same places (not its label), each with -inf or finfo.min
    (mixed conventions too): forward terms and gradient equal the reference's with -inf masks,
    every thread schedule. (The kernel's NaN for masked-only threads was found by a reviewer's
    hand-made input; its NaN-or-finite for a student -inf at a teacher finfo.min by another.)"""
    emu_lib.configure(schedule=schedule, seed=seed)
    s, t, y = distill_inputs(rows, vocab, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(rows, vocab, generator=gen) < density
    masked[torch.arange(rows), torch.randint(vocab, (rows,), generator=gen)] = False
    s_masked = masked & (torch.rand(rows, vocab, generator=gen) < 0.5)
    valid = y != -100
    s_masked[valid.nonzero()[:, 0], y[valid]] = False
    s_low, t_low = (torch.finfo(dtype).min if f else -math.inf for f in fills)
    s_in, t_in = s.masked_fill(s_masked, s_low), t.masked_fill(masked, t_low)
    s_inf, t_inf = s.masked_fill(s_masked, -math.inf), t.masked_fill(masked, -math.inf)
    want = reference.distill_fwd(s_inf, t_inf, y, temp)
    rc, got, bad = run_distill_fwd(emu_lib, s_in, t_in, y, temp)
    assert (rc, bad) == (CUDA_SUCCESS, 0)
    for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=name)
    rc, grad = run_distill_bwd(emu_lib, s_in, t_in, y, got[2], 0.7, 0.3, temp)
    want_g = reference.distill_bwd(s_inf, t_inf, y, want[2], torch.tensor(0.7), 0.3, temp)
    assert rc == CUDA_SUCCESS
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad, want_g, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distill_rows_of_huge_logits(emu: Emu, dtype: torch.dtype) -> None:
    """A teacher all finfo.min (uniform, as the reference computes it), all -1e30, a student
    all -1e30, both offset by 1e4, over 2100 columns (several chunks a thread): the KL equals
    the reference's; it summed e (t - s) on the raw logits before (-inf, or 0)."""
    s, t, y = distill_inputs(5, 2100, dtype, seed=29)
    y = torch.where(y == -100, 0, y)
    t[0] = torch.finfo(dtype).min
    t[1] = -1e30
    s[2] = -1e30
    s[3], t[3] = (s[3].float() + 1e4).to(dtype), (t[3].float() + 1e4).to(dtype)
    for temp in (1.0, 2.0):
        rc, got, _ = run_distill_fwd(emu, s, t, y, temp)
        want = reference.distill_fwd(s, t, y, temp)
        assert rc == CUDA_SUCCESS
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4, msg=f"T={temp}")
        torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5, msg=f"T={temp}")


def test_distill_infinite_logits(emu: Emu) -> None:
    """A +inf logit makes its row's log-sum-exps +inf (the thread sums are NaN there), so the
    CE +inf, NaN where the label's own logit is +inf: forward and backward equal the
    reference's NaN for NaN, with and without a teacher, at T = 1 and T != 1."""
    s, t, y = distill_inf_inputs()
    for teacher, eta in ((t, 0.3), (None, 0.0)):
        for temp in (1.0, 2.5):
            rc, got, bad = run_distill_fwd(emu, s, teacher, y, temp)
            want = reference.distill_fwd(s, teacher, y, temp)
            assert (rc, bad) == (CUDA_SUCCESS, 0)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, equal_nan=True)
            rc, grad = run_distill_bwd(emu, s, teacher, y, got[2], 0.7, eta, temp)
            want_g = reference.distill_bwd(s, teacher, y, want[2], torch.tensor(0.7), eta, temp)
            assert rc == CUDA_SUCCESS
            torch.testing.assert_close(grad, want_g, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_distill_ignored_rows_and_row_ends(emu: Emu, temp: float) -> None:
    """Rows of 1000 logits (a thread's later load lands exactly on the row end: j == V must read
    nothing, not the next row's first logit) and of 2600 (two chunks a thread) whose student and
    teacher logits grow along the row, so the running maxima move at a thread's second chunk
    (the rescale of sum exp(s - max) at T != 1 uses 1, not 1 / T): forward and gradient as the
    reference. The ignored row's
    outputs are exactly +0 (the guarded buffers' fill, 0xA5A5A5A5 = -2.9e-16, is within any
    tolerance, so an unwritten CE or log-sum-exp passed test_distill)."""
    for vocab in (1000, 2600):
        s, t, y = distill_inputs(3, vocab, torch.float32, seed=vocab)
        if vocab > 2048:  # a ramp of 12 (the row's lse stays small: fp32 tolerances hold)
            ramp = torch.linspace(0.0, 12.0, vocab)
            s, t = s + ramp, t + 0.5 * ramp
        assert int(y[1]) == -100
        want = reference.distill_fwd(s, t, y, temp)
        rc, got, bad = run_distill_fwd(emu, s, t, y, temp)
        assert (rc, bad) == (CUDA_SUCCESS, 0)
        for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"V={vocab} {name}")
            assert_bits_equal(g[1], torch.zeros_like(g[1]), f"V={vocab} ignored row {name}")
        want_g = reference.distill_bwd(s, t, y, want[2], torch.tensor(0.7), 0.3, temp)
        rc, grad = run_distill_bwd(emu, s, t, y, got[2], 0.7, 0.3, temp)
        assert rc == CUDA_SUCCESS
        torch.testing.assert_close(grad, want_g, atol=1e-6, rtol=1e-5, msg=f"V={vocab}")
        assert_bits_equal(grad[1], torch.zeros_like(grad[1]), f"V={vocab} ignored row grad")


# ---- null flags ------------------------------------------------------------------------------


def test_null_flag_pointers_skip_only_the_check(emu: Emu) -> None:
    """The glue passes nullptr for the error flag when it will not read it (check_meta=False,
    value checks off, graph capture): each kernel then writes the same outputs as with a flag,
    on the bad data that would raise it (a NaN weight, an invalid 2:4 group)."""
    gen = torch.Generator().manual_seed(31)
    w = make_weights((6, 40), torch.float32, gen)
    w[2, 7] = float("nan")
    for mode in (MASK, PRUNE, COMPRESS):
        rc, flagged, bad = run_nm_select(emu, w, mode, 2, 4)
        assert (rc, bad) == (CUDA_SUCCESS, 1)
        rc, unflagged, _ = run_nm_select(emu, w, mode, 2, 4, null_flag=True)
        assert rc == CUDA_SUCCESS
        for name, t in flagged.items():
            assert_bits_equal(unflagged[name], t, f"nm_select mode {mode} {name}")
    k = 96
    wp = reference.sparse24_prune(torch.randn(16, k, generator=gen))
    values, meta = reference.sparse24_compress(wp)
    corrupt = meta.clone()
    corrupt[5, 3] = (corrupt[5, 3] & 0xF0) | 0x7
    rc, out, bad = run_decompress(emu, values, corrupt)
    assert (rc, bad) == (CUDA_SUCCESS, 1)
    rc, out_null, _ = run_decompress(emu, values, corrupt, null_flag=True)
    assert rc == CUDA_SUCCESS
    assert_bits_equal(out_null, out, "decompress")
    x = torch.randn(3, k, generator=gen)
    rc, y, bad = run_gemv(emu, x, values, corrupt, None)
    assert (rc, bad) == (CUDA_SUCCESS, 1)
    rc, y_null, _ = run_gemv(emu, x, values, corrupt, None, null_flag=True)
    assert rc == CUDA_SUCCESS
    assert_bits_equal(y_null, y, "gemv")
