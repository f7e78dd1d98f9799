"""The CPU kernels' lower instruction-set versions, on this machine.

The mask, compression, AdamS, GEMM and distillation-loss kernels pick an x86-64-v4 (AVX-512),
v3 (AVX2) or baseline version at load, and the bf16 GEMM an AVX-512 BF16 one where the CPU has
it (``build_info()["cpu_isa"]``: "avx512_bf16"); the environment variable ``CAST_EXT_CPU_ISA``
caps the choice.
The machine that runs the tests usually has the best one, so the others are run here in
subprocesses with the cap set. (AdamS's versions are also compared bit for bit in
test_adams.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import capped_isa

import cast_ext

HERE = Path(__file__).parent
KERNEL_TESTS = ("test_masks.py", "test_sparse24_gemm.py", "test_adams.py", "test_distill.py")


@pytest.mark.skipif("CAST_EXT_EXPECT_ISA" not in os.environ, reason="run by the test below")
def test_the_cap_took_effect() -> None:
    assert cast_ext.build_info()["cpu_isa"] == os.environ["CAST_EXT_EXPECT_ISA"]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_cpu_kernels_under_a_lower_isa(isa: str) -> None:
    env = {**os.environ, "CAST_EXT_CPU_ISA": isa, "CAST_EXT_EXPECT_ISA": capped_isa(isa)}
    args = [
        f"{HERE / 'test_cpu_isa.py'}::test_the_cap_took_effect",
        *(str(HERE / f) for f in KERNEL_TESTS),
        "-k",
        "not isa_versions",
        "-rs",  # skip reasons: the cap check must not be among them
    ]
    # No -m filter: the all-device property tests (hypothesis, ties included) carry the cuda
    # mark for the GPU suite and run on the CPU here too; the CUDA-only ones skip.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "run by the test below" not in done.stdout


@pytest.mark.parametrize("value", ["AVX2", "x86-64-v3"])
def test_the_cap_is_case_blind_and_an_unknown_one_says_so(value: str) -> None:
    """CAST_EXT_CPU_ISA=AVX2 capped nothing, nor did a misspelt level, silently: a test of the
    lower versions then ran the best one. Case no longer matters; an unknown value is ignored
    with a line on stderr naming it."""
    code = "import cast_ext; print(cast_ext.build_info()['cpu_isa'])"
    env = {**os.environ, "CAST_EXT_CPU_ISA": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    native = cast_ext.build_info()["cpu_isa"]
    if value == "AVX2":
        assert done.stdout.strip() == capped_isa("avx2") and "CAST_EXT_CPU_ISA" not in done.stderr
    else:
        assert done.stdout.strip() == native
        levels = "avx512_bf16, avx512, avx2, default"
        assert f"CAST_EXT_CPU_ISA=x86-64-v3 is not one of {levels}" in done.stderr
