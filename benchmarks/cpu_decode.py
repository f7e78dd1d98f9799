"""Greedy decoding on the CPU: a 2:4 model through ``SparseLinear`` against the same model dense.

    python -m benchmarks.cpu_decode [--rounds 9] [--quick]

The demo's model, SmolLM2-135M-Instruct (from the demo's cache: ``python -m cast_ext demo``
fills it), or with ``--quick`` a small random LLaMA. Its layers are pruned to 2:4 by magnitude
(``cast_ext.demo.magnitude_prune``), so both models hold the same weights; one keeps its
``nn.Linear`` layers ("dense"), the other has them swapped by ``cast_ext.nn.to_sparse`` in auto
mode ("sparselinear_auto": per shape the packed kernel or dense, whichever ran faster in its
first calls, made in the warm-up round). A round is 32 new tokens after a 16-token prompt,
greedy, with the KV cache, through ``generate``. The two models alternate round by round in
one process: on a shared machine the time of a round drifts by 20% and more between runs, and
interleaving keeps that drift out of the ratio. Then the prefill of a 256-token prompt (one
forward, no cache), the two models alternating the same way. The embeddings and the tied head
stay dense.
Writes ``benchmarks/results/cpu_decode.json`` (rows as the GPU benchmarks write them; --quick
writes to /tmp). Not in ``benchmarks/gpu_suite.sh``, which runs ``bench_*.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import cast_ext
from benchmarks._harness import write_rows
from cast_ext import demo

NEW_TOKENS = 32
PROMPT = 16
PREFILL = 256


def _model(quick: bool) -> torch.nn.Module:
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    return demo.load_smollm2(verbose=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="a small random LLaMA, 3 rounds")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    base = _model(args.quick)
    _, masks = demo.magnitude_prune(base)  # plain nn.Linear layers again, exactly 2:4
    names = {name.removesuffix(".weight") for name in masks}  # masks: by weight name
    prompt = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=torch.Generator())
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        models = {"dense": copy.deepcopy(base).to(dtype)}
        models["sparselinear_auto"] = cast_ext.nn.to_sparse(
            copy.deepcopy(base).to(dtype), filter_fn=lambda name, m: name in names
        )
        swapped = sum(
            isinstance(m, cast_ext.nn.SparseLinear) for m in models["sparselinear_auto"].modules()
        )
        if swapped != len(names):  # (a dense model against itself would measure nothing)
            raise RuntimeError(f"to_sparse swapped {swapped} of the {len(names)} pruned layers")

        def decode(model: torch.nn.Module) -> None:
            out = model.generate(
                prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            assert out.shape == (1, PROMPT + NEW_TOKENS)

        # round 0: warm-up, and the dispatch's timed calls
        times = _alternate(models, decode, rounds)
        decisions = [
            d for d in cast_ext.nn.dispatch_decisions()
            if d["dtype"] == str(dtype).removeprefix("torch.")
        ]  # fmt: skip
        rows += _rows(
            times, decisions, {"op": "greedy_decode", "new_tokens": NEW_TOKENS}, NEW_TOKENS, 2,
            dtype, rounds, args.quick, "",
        )  # fmt: skip
        rows += _prefill(models, base.config.vocab_size, rounds, dtype, args.quick)
    print(write_rows("cpu_decode", rows, "/tmp" if args.quick else None))


def _prefill(
    models: dict[str, torch.nn.Module], vocab: int, rounds: int, dtype: torch.dtype, quick: bool
) -> list[dict]:
    """One forward of a PREFILL-token prompt (no cache), the models alternating: the sizes where
    the CPU kernels put rows of x in the vector lanes. The sparse model's first forwards make
    its dispatch's timed calls at this size, before the timed rounds."""
    prompt = torch.randint(0, vocab, (1, PREFILL), generator=torch.Generator())
    sparse = models["sparselinear_auto"]
    shapes = {
        (m.out_features, m.in_features)
        for m in sparse.modules()
        if isinstance(m, cast_ext.nn.SparseLinear)
    }
    dt = str(dtype).removeprefix("torch.")

    def decided() -> list[dict]:
        return [
            d for d in cast_ext.nn.dispatch_decisions()
            if d["dtype"] == dt and d["m_bucket"] == PREFILL
        ]  # fmt: skip

    with torch.no_grad():
        for _ in range(40):
            if len(decided()) >= len(shapes):
                break
            sparse(prompt, use_cache=False)
    times = _alternate(models, lambda model: model(prompt, use_cache=False), rounds)
    return _rows(
        times, decided(), {"op": "prefill", "prompt_tokens": PREFILL}, PREFILL, 1, dtype, rounds,
        quick, "prefill ",
    )  # fmt: skip


def _alternate(
    models: dict[str, torch.nn.Module], call: Callable[[torch.nn.Module], object], rounds: int
) -> dict[str, list[float]]:
    """Seconds of ``call(model)`` per round for each model, the models alternating round by round
    (no grad); round 0, a warm-up, is not kept."""
    times: dict[str, list[float]] = {impl: [] for impl in models}
    with torch.no_grad():
        for r in range(rounds + 1):
            for impl, model in models.items():
                t0 = time.perf_counter()
                call(model)
                if r:
                    times[impl].append(time.perf_counter() - t0)
    return times


def _rows(
    times: dict[str, list[float]], decisions: list[dict], op: dict, tokens: int, digits: int,
    dtype: torch.dtype, rounds: int, quick: bool, label: str,
) -> list[dict]:  # fmt: skip
    """One result row per model (medians, the ratio to dense, the sparse model's decisions),
    each printed."""
    dense_ms = statistics.median(times["dense"]) * 1e3
    rows = []
    for impl, t in times.items():
        ms = statistics.median(t) * 1e3
        rows.append({
            "op": op["op"], "impl": impl, "device": "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "model": "tiny LLaMA" if quick else "SmolLM2-135M-Instruct",
            **{key: v for key, v in op.items() if key != "op"},
            "rounds": rounds, "median_ms": round(ms, 1),
            "tokens_per_s": round(tokens / ms * 1e3, digits), "baseline": "dense",
            "ratio_time_vs_dense": round(ms / dense_ms, 3),
            "dispatch": decisions if impl == "sparselinear_auto" else None,
        })  # fmt: skip
        print(f"{dtype} {label}{impl:18s} {ms:8.1f} ms  {ms / dense_ms:.3f}x dense's time")
    return rows


if __name__ == "__main__":
    main()
