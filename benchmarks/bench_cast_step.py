"""One CAST training step vs one dense AdamW step, and the optimizer's share of each.

CAST step: teacher forward (no grad) + student forward with the weight scales + chunked
distillation loss + backward + ``cast_ext.AdamS.step``. Baseline: forward + CE + backward +
``torch.optim.AdamW(fused=True)`` (foreach on CPU) on the same dense model. Every forward has
``use_cache=False``, as in ``cast.train``. The model has
SmolLM2-135M's shapes (the demo's model) with random weights: timing does not depend on the
values, and nothing needs to be downloaded or converted.

    python -m benchmarks.bench_cast_step [--batch 8] [--seq 256] [--device cuda]

Rows go to ``benchmarks/results/cast_step.json`` (or ``$OUT``), written after each measurement
(a run stopped by a time limit keeps what it finished). The optimizer-alone rows time each
optimizer's step on the gradients of one more forward + backward (never on zeroed gradients).
Then the CAST step's parts, each alone: the dense and the student forward + loss + backward (the
student's with the teacher's logits computed beforehand; also with each projection's scaled weight
read through torch's parametrization, as before ``cast_ext::scaled_linear``) and the teacher's
forward. On CUDA each row also has ``host_us``, the host's time per call: near the device time,
the host set the pace.
On CUDA a last row times the CAST step with the teacher wrapped in ``cast.CudaGraphTeacher``
(one graph replay per forward). ``--profile`` also writes ``cast_step_profile.txt``:
torch.profiler's table of each step's ops.
``CAST_EXT_BENCH_QUICK=1``: a 2-layer model, few repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cast_ext
from cast_ext import cast

from ._harness import Row, cpu_time_us, cuda_time_us, quick, results_dir, write_rows

VOCAB = 49152  # SmolLM2's vocabulary


def smollm2_like(layers: int = 30) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    return LlamaForCausalLM(cfg)


def prepare_parametrized(model: torch.nn.Module) -> torch.nn.Module:
    """``cast.prepare(model)`` (in place), each projection then run as before
    ``cast_ext::scaled_linear``: ``nn.Linear.forward`` on the class parametrize made for it, so
    the weight is read through torch's parametrization property. ``model`` must not share
    those classes with another prepared model (a deepcopy of a prepared model would): prepare
    a copy of the unprepared one."""
    for layer in cast.prepare(model):
        type(layer.module).forward = torch.nn.Linear.forward
    return model


class Steps:
    """The two training steps compared, on SmolLM2-135M's shapes with random weights: a dense
    model with AdamW (fused on CUDA, foreach on the CPU), and its CAST student (``cast.prepare``,
    AdamS, embeddings and norms frozen in both) distilled from a frozen copy of the dense model.
    Step ``i`` trains on the ``i % 3``-th of 3 batches of random token ids."""

    def __init__(self, dev: torch.device, layers: int, batch: int, seq: int) -> None:
        torch.manual_seed(0)
        self.dense = smollm2_like(layers).to(dev)
        self.teacher = copy.deepcopy(self.dense).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.dense)
        cast.prepare(self.student)
        groups = cast.param_groups(self.student, freeze_embeddings=True, freeze_norms=True)
        self.adams = cast_ext.AdamS(groups, lr=1e-5, decay=1e-3, total_steps=10**6)
        for m in self.dense.modules():  # same frozen set for the baseline
            if isinstance(m, torch.nn.Embedding) or "Norm" in type(m).__name__:
                m.requires_grad_(False)
        trained = [q for q in self.dense.parameters() if q.requires_grad]
        self.adamw = torch.optim.AdamW(trained, lr=1e-5, fused=dev.type == "cuda")
        self.ids = [torch.randint(0, VOCAB, (batch, seq), device=dev) for _ in range(3)]
        self.labels = [cast.shift_labels(x) for x in self.ids]

    def dense_grads(self, i: int) -> None:
        x, y = self.ids[i % 3], self.labels[i % 3]
        cast.distill_loss(self.dense(x, use_cache=False).logits, None, y, eta=0.0).backward()

    def dense_step(self, i: int) -> None:
        self.dense_grads(i)
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=False)

    def eager_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x, use_cache=False).logits

    def cast_grads(self, i: int, teach: Callable[[torch.Tensor], torch.Tensor] | None = None):
        x, y = self.ids[i % 3], self.labels[i % 3]
        with torch.no_grad():
            t_logits = (teach or self.eager_teacher)(x)
        cast.distill_loss(self.student(x, use_cache=False).logits, t_logits, y).backward()

    def cast_step(self, i: int, teach: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cast_grads(i, teach)
        self.adams.step()
        self.adams.zero_grad(set_to_none=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="also write cast_step_profile.txt")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if not hasattr(cast_ext, "AdamS"):
        raise SystemExit("bench_cast_step: cast_ext.AdamS is not available in this build")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    layers, batch, seq = (2, 2, 64) if quick() else (30, args.batch, args.seq)
    st = Steps(dev, layers, batch, seq)
    dense, teacher, student, adams, adamw = st.dense, st.teacher, st.student, st.adams, st.adamw
    ids, labels = st.ids, st.labels
    dense_grads, dense_step, eager_teacher = st.dense_grads, st.dense_step, st.eager_teacher
    cast_grads, cast_step = st.cast_grads, st.cast_step

    host: list[float] = []  # the host's time in each call of the last timing (CUDA)

    def timed(fn, reps: int = 30) -> tuple[float, float, float]:
        if dev.type == "cuda":

            def clocked(i: int) -> None:
                t0 = time.perf_counter()
                fn(i)
                host.append((time.perf_counter() - t0) * 1e6)

            host.clear()
            t = cuda_time_us(clocked, n_inputs=3, warmup=5, reps=10 if quick() else reps)
            del host[:5]  # the warm-up calls
            return t
        return cpu_time_us(lambda: fn(0), warmup=1, reps=2 if quick() else 5)

    tokens = batch * seq
    shape = f"smollm2-135m-shapes L={layers} tokens={tokens}"
    base = {"device": dev.type, "dtype": "float32", "shape": shape}
    rows: list[Row] = []
    print(f"{shape} on {dev}:", flush=True)

    def record(op: str, impl: str, t: tuple[float, float, float], baseline: str, vs: float) -> Path:
        row: Row = {**base, "op": op, "impl": impl, "median_us": t[0], "p20_us": t[1],
                    "p80_us": t[2], "baseline": baseline,
                    "time_vs_baseline": t[0] / vs}  # fmt: skip
        note = ""
        if host:  # CUDA: a device time near the host's means the host set the pace
            row["host_us"] = statistics.median(host)
            note = f"  (host {row['host_us'] / 1e3:.2f} ms)"
        rows.append(row)
        print(f"  {op:<15} {impl:<25} {t[0] / 1e3:9.2f} ms  {t[0] / vs:6.3f}x {baseline}{note}",
              flush=True)  # fmt: skip
        return write_rows("cast_step", rows)  # after each row: a run stopped by a limit keeps them

    t_dense = timed(dense_step)
    record("train_step", "dense_adamw", t_dense, "dense_adamw", t_dense[0])
    t_cast = timed(cast_step)
    record("train_step", "cast", t_cast, "dense_adamw", t_dense[0])
    # The optimizer alone, on real gradients: the steps' zero_grad(set_to_none=False) left zeros,
    # which can run faster than real data (METHOD.md), so one more forward + backward first; the
    # timed steps then reuse its gradients.
    dense_grads(0)
    t_adamw = timed(lambda i: adamw.step())
    record("optimizer_step", "adamw", t_adamw, "train_step dense_adamw", t_dense[0])
    cast_grads(0)
    t_adams = timed(lambda i: adams.step())
    path = record("optimizer_step", "adams", t_adams, "train_step cast", t_cast[0])
    # Where the rest of the CAST step goes: its parts, each timed alone (10 calls).
    with torch.no_grad():
        t_logits = [eager_teacher(x) for x in ids]

    def student_grads(i: int) -> None:  # the teacher's logits computed beforehand
        cast_grads(i, lambda _: t_logits[i % 3])

    def teacher_forward(i: int) -> None:
        with torch.no_grad():
            eager_teacher(ids[i % 3])

    parametrized = prepare_parametrized(copy.deepcopy(dense).train())
    parametrized.load_state_dict(student.state_dict())

    def parametrized_grads(i: int) -> None:
        loss = cast.distill_loss(
            parametrized(ids[i % 3], use_cache=False).logits, t_logits[i % 3], labels[i % 3]
        )
        loss.backward()

    for op, impl, fn in (
        ("fwd_bwd", "dense", dense_grads),
        ("fwd_bwd", "cast_student", student_grads),
        ("fwd_bwd", "cast_student_parametrized", parametrized_grads),
        ("forward", "cast_teacher", teacher_forward),
    ):
        path = record(op, impl, timed(fn, reps=10), "train_step cast", t_cast[0])
    if dev.type == "cuda":  # last: a capture that fails or differs warns, and runs eagerly
        graphed = cast.CudaGraphTeacher(teacher)
        t_graphed = timed(lambda i: cast_step(i, graphed), reps=10)
        path = record("train_step", "cast_graphed_teacher", t_graphed, "train_step cast", t_cast[0])
        captured = sum(entry is not None for entry in graphed._graphs.values())
        print(f"  teacher graphs captured: {captured} of {len(graphed._graphs)} shapes")
    adams.zero_grad(set_to_none=False)
    adamw.zero_grad(set_to_none=False)
    if args.profile:
        on_cuda = next(dense.parameters()).is_cuda
        _profile(on_cuda, {"dense_adamw": dense_step, "cast": cast_step})
    ms = {k: v[0] / 1e3 for k, v in [("d", t_dense), ("c", t_cast), ("w", t_adamw), ("s", t_adams)]}
    print(f"  dense AdamW step {ms['d']:9.2f} ms (optimizer {ms['w']:.2f} ms, "
          f"{100 * ms['w'] / ms['d']:.1f}%)")  # fmt: skip
    print(f"  CAST step        {ms['c']:9.2f} ms (AdamS {ms['s']:.2f} ms, "
          f"{100 * ms['s'] / ms['c']:.1f}%), {ms['c'] / ms['d']:.2f}x the dense step")  # fmt: skip
    print(f"  wrote {path}")


def _profile(on_cuda: bool, steps: dict) -> Path:
    """torch.profiler over 2 calls of each step (after a warm-up call): the ops taking the most
    device time (CPU: host time), one table per step, in ``cast_step_profile.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    out = [f"torch.profiler, 2 calls per step after a warm-up call, sorted by {key}"]
    for name, fn in steps.items():
        fn(0)
        with profile(activities=activities) as prof:
            for i in range(2):
                fn(i)
            if on_cuda:
                torch.cuda.synchronize()
        out += [f"\n== {name}", prof.key_averages().table(sort_by=key, row_limit=25)]
    path = results_dir() / "cast_step_profile.txt"
    path.write_text("\n".join(out) + "\n")
    print(f"  profile: {path}")
    return path


if __name__ == "__main__":
    main()
