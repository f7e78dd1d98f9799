"""examples/cast_fsdp2.py end to end on CPU: torchrun with 2 gloo ranks, a tiny LLaMA saved as a
Hugging Face checkpoint, random token ids. No downloads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_trained, requires_cuda
from test_cast import VOCAB, tiny_gpt2, tiny_llama

from cast_ext import cast

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cast_fsdp2.py"
SEQ, STEPS = 16, 6


def run_example(
    out: Path, data: Path, *extra: str, device: str = "cpu", ranks: int = 2, ok: bool = True
) -> str:
    """Run the example; assert it succeeded (or, ``ok=False``, failed); return its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--log-dir", str(out.parent / "torchrun-logs")]  # not a torchelastic_* dir in /tmp
    cmd += [f"--nproc_per_node={ranks}", str(SCRIPT), "--device", device]
    cmd += ["--model", str(data / "model"), "--out", str(out)]
    cmd += ["--train", str(data / "train.npy"), "--val", str(data / "val.npy")]
    cmd += ["--seq", str(SEQ), "--batch", "2", "--steps", str(STEPS), "--save-every", "3"]
    cmd += ["--lr", "3e-3", "--warmup", "2", "--decay", "1e-2", "--mask-interval", "2"]
    cmd += ["--health-every", "2", "--save-dtype", "float32", *extra]
    # cast_ext from this tree, in the caller's environment (whatever else is on its path)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_tokenize_corpus_concatenates_documents_with_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>", "thou", "art", "the", "king"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    )
    fast.save_pretrained(tmp_path / "model")
    (tmp_path / "a.txt").write_text("thou art the king")
    (tmp_path / "b.txt").write_text("the king art thou\nnot")
    out = tmp_path / "ids.npy"
    cmd = [sys.executable, str(ROOT / "examples" / "tokenize_corpus.py")]
    cmd += ["--model", str(tmp_path / "model"), "--out", str(out)]
    cmd += [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "11 tokens (uint16) from 2 files" in proc.stdout
    ids = np.load(out)
    assert ids.dtype == np.uint16 and ids.tolist() == [2, 3, 4, 5, 1, 4, 5, 3, 2, 0, 1]


def make_data(data: Path, build=tiny_llama) -> np.ndarray:
    """A tiny model's checkpoint and train / val token ids under ``data``; returns the val ids."""
    torch.manual_seed(0)
    build().save_pretrained(data / "model")
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(0, VOCAB, 4000).astype(np.uint16))
    val = rng.integers(0, VOCAB, 20 * SEQ).astype(np.int32)
    np.save(data / "val.npy", val)
    return val


def test_cast_fsdp2_example_resumes_bitwise_and_writes_an_exact_24_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    val = make_data(data)
    run_example(tmp_path / "straight", data)
    run_example(tmp_path / "resumed", data, "--stop-after", "3")
    assert not (tmp_path / "resumed" / "final").exists()
    run_example(tmp_path / "resumed", data, "--resume")
    assert sorted(d.name for d in (tmp_path / "resumed").glob("step-*")) == ["step-3", "step-6"]
    # a fresh run into a folder that holds one is refused (it would mix the two)
    said = run_example(tmp_path / "resumed", data, ok=False)
    assert "holds a run (checkpoint of step 6): pass --resume" in said
    # the same windows in micro-batches of one, blocks recomputed in backward, one checkpoint
    # kept: the same training, up to rounding
    run_example(
        tmp_path / "accumulated",
        data,
        *("--batch", "1", "--grad-accum", "2", "--activation-checkpointing", "--keep", "1"),
    )
    assert [d.name for d in (tmp_path / "accumulated").glob("step-*")] == ["step-6"]

    # The resumed run wrote the same model, byte for byte, and logged every step once.
    final = tmp_path / "straight" / "final" / "model.safetensors"
    assert final.read_bytes() == (tmp_path / "resumed" / "final" / "model.safetensors").read_bytes()
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").open()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, STEPS + 1))
    straight = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").open()]
    tokens = [r["tokens"] for r in straight if r["kind"] == "train"]
    assert [r["tokens"] for r in log if r["kind"] == "train"] == tokens  # counted on after resume
    # the resume point's health once (the stopped run's; the resumed one does not repeat it)
    assert [r["step"] for r in log if r["kind"] == "health"] == [0, 2, 3, 4, 6]
    # activation checkpointing turned the student's KV cache off, not the written model's
    config = json.loads((tmp_path / "accumulated" / "final" / "config.json").read_text())
    assert config["use_cache"] is True

    # It loads without cast_ext, every projection exactly 2:4, and computes the perplexity the
    # script measured on the pruned, sharded student.
    report = json.loads((tmp_path / "straight" / "final_report.json").read_text())
    assert report["exactly_24_layers"] == "14/14" and report["steps"] == STEPS
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final")
    projections = [m for n, m in model.named_modules() if n.endswith("proj")]
    assert len(projections) == 14
    for module in projections:
        assert ((module.weight.reshape(-1, 4) != 0).sum(-1) == 2).all()
    windows = torch.from_numpy(val.astype(np.int64)).reshape(-1, SEQ)[:16]
    ppl = cast.perplexity(model, windows, batch_size=2)
    assert math.isfinite(ppl) and ppl == pytest.approx(report["val_ppl_after_prune"], rel=1e-4)
    accumulated = json.loads((tmp_path / "accumulated" / "final_report.json").read_text())
    for key in ("val_ppl_before_prune", "val_ppl_after_prune"):
        assert accumulated[key] == pytest.approx(report[key], rel=1e-4), key


def test_cast_fsdp2_example_with_tensor_parallel_matches_fsdp2(tmp_path: Path) -> None:
    """--tp 2 on 4 ranks: tensor parallel within pairs, FSDP2 over the 2 pairs (a 2-D mesh;
    pretrained weights broadcast into 2-D DTensors, FSDP2's strided shards of the column-wise
    rows). Each pair draws the windows 2 FSDP2 ranks would: the same training, up to rounding."""
    data = tmp_path / "data"
    make_data(data)
    run_example(tmp_path / "fsdp", data)
    run_example(tmp_path / "tp", data, "--tp", "2", ranks=4)
    reports = [json.loads((tmp_path / d / "final_report.json").read_text()) for d in ("fsdp", "tp")]
    assert reports[1]["tp"] == 2 and reports[1]["exactly_24_layers"] == "14/14"
    for key in ("val_ppl_before_prune", "val_ppl_after_prune"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-5), key
    from safetensors.torch import load_file

    want, got = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("fsdp", "tp"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        # lr 3e-3 over 6 steps: a few elements drift by up to 1.6e-5 on an AMD EPYC
        assert_close_trained(got[key], value, rtol=1e-4, atol=1e-5, loose_atol=1e-4, msg=key)
        assert torch.equal(got[key] != 0, value != 0), key  # the same 2:4 masks


def gpt2_with_dropout() -> torch.nn.Module:
    """tiny_gpt2, saved with dropout 0.1 (what the example builds from its config)."""
    model = tiny_gpt2()
    model.config.update({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    return model


def test_cast_fsdp2_example_on_gpt2(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers (weights stored [in, out]) go through the example too: loaded into
    the prepared student transposed, written back in their own layout, exactly 2:4 along the
    input dim. With dropout, a resumed run is still the straight one byte for byte (each step's
    random numbers come from the step). --save-every 0: a checkpoint at the end only."""
    data = tmp_path / "data"
    val = make_data(data, gpt2_with_dropout)
    run_example(tmp_path / "out", data, "--save-every", "0")
    assert [d.name for d in (tmp_path / "out").glob("step-*")] == [f"step-{STEPS}"]
    run_example(tmp_path / "resumed", data, "--save-every", "0", "--stop-after", "3")
    run_example(tmp_path / "resumed", data, "--save-every", "0", "--resume")
    final = (tmp_path / d / "final" / "model.safetensors" for d in ("out", "resumed"))
    assert next(final).read_bytes() == next(final).read_bytes()
    report = json.loads((tmp_path / "out" / "final_report.json").read_text())
    assert report["exactly_24_layers"] == "8/8"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    conv1d = [m for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc", "proj"))]
    assert len(conv1d) == 8
    for module in conv1d:  # [in, out]: groups of 4 run down the columns
        assert ((module.weight.t().reshape(-1, 4) != 0).sum(-1) == 2).all()
    windows = torch.from_numpy(val.astype(np.int64)).reshape(-1, SEQ)[:16]
    ppl = cast.perplexity(model, windows, batch_size=2)
    assert ppl == pytest.approx(report["val_ppl_after_prune"], rel=1e-4)


def tiny_mixtral() -> torch.nn.Module:
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(cfg)


def test_cast_fsdp2_example_on_a_mixture_of_experts(tmp_path: Path) -> None:
    """A Mixtral (experts as 3-D stacks): prepared, sharded and trained by the example, written
    as a Hugging Face checkpoint whose attention projections and every expert are exactly 2:4
    along their input dim."""
    data = tmp_path / "data"
    val = make_data(data, tiny_mixtral)
    run_example(tmp_path / "out", data, "--save-every", "0")
    report = json.loads((tmp_path / "out" / "final_report.json").read_text())
    assert report["exactly_24_layers"] == "12/12"  # q, k, v, o and 2 stacks, in 2 layers
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    experts = [m for n, m in model.named_modules() if n.endswith("experts")]
    assert len(experts) == 2
    for m in experts:  # [experts, out, in]
        for w in (m.gate_up_proj, m.down_proj):
            assert ((w.reshape(-1, 4) != 0).sum(-1) == 2).all()
    windows = torch.from_numpy(val.astype(np.int64)).reshape(-1, SEQ)[:16]
    ppl = cast.perplexity(model, windows, batch_size=2)
    assert ppl == pytest.approx(report["val_ppl_after_prune"], rel=1e-4)


@requires_cuda
@pytest.mark.timeout(150)  # torchrun, NCCL's start and a short run: over the suite's 60 s
def test_cast_fsdp2_example_on_cuda(tmp_path: Path) -> None:
    """One rank on the GPU: nccl, bf16 compute with fp32 masters, a bf16 teacher."""
    data = tmp_path / "data"
    make_data(data)
    run_example(tmp_path / "out", data, device="cuda", ranks=1)
    report = json.loads((tmp_path / "out" / "final_report.json").read_text())
    assert report["exactly_24_layers"] == "14/14"
    assert math.isfinite(report["val_ppl_after_prune"])


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cast_fsdp2", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cast_fsdp2_example_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """--seq 0 / --batch 0 / --device cuda without a GPU ended in tracebacks on every rank."""
    example = _example_module()
    base = ["--model", "m", "--train", "t.npy", "--out", "o", "--steps", "4"]
    bad = [["--seq", "1"], ["--batch", "0"], ["--grad-accum", "0"], ["--stop-after", "0"]]
    bad += [["--steps", "0"], ["--timeout-min", "0"], ["--decay-frac", "0"], ["--decay-frac", "2"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for extra in bad:
        with pytest.raises(SystemExit) as info:
            example.parse_args([*base, *extra])
        assert info.value.code == 2, extra
    err = capsys.readouterr().err
    assert "--seq must be >= 2, got 1" in err and "--batch must be >= 1, got 0" in err
    assert "--decay-frac must be in (0, 1], got 2.0" in err


def test_cast_fsdp2_example_log_of_a_finished_run_resumed(tmp_path: Path) -> None:
    """--resume of a finished run records its last health and evaluation again: the stopped
    run's records of that step go, so the log holds each once (it held them twice)."""
    example = _example_module()
    log = tmp_path / "log.jsonl"
    records = [
        {"kind": "train", "step": 4},
        {"kind": "health", "step": 4},
        {"kind": "eval", "step": 4},
        {"kind": "train", "step": 5},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    example.trim_log(log, 4)
    assert [json.loads(x) for x in log.read_text().splitlines()] == records[:3]
    example.trim_log(log, 4, done=True)
    assert [json.loads(x) for x in log.read_text().splitlines()] == records[:1]
