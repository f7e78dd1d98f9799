"""CAST on many GPUs with FSDP2: a Hugging Face causal LM in, an exactly 2:4 one out.

    torchrun --nproc_per_node=8 examples/cast_fsdp2.py --model /path/to/hf_model \\
        --train train_tokens.npy --val val_tokens.npy --steps 2000 --out runs/cast

In the order a model too large for one device needs:

1. the student and the frozen dense teacher are built on the meta device (no memory); with
   ``--tp N`` their decoder blocks are split over groups of N ranks first (tensor parallel,
   Megatron-style: the q/k/v, gate and up projections column-wise, o and down row-wise; LLaMA
   naming), and FSDP2 below shards over the groups (a 2-D mesh, world / N x N);
2. ``cast.prepare(student)`` attaches the learnable scales; then every decoder block and the
   root are ``fully_shard``-ed (on CUDA: bf16 compute, fp32 master weights and reductions);
3. the shards are materialised and the pretrained weights loaded from rank 0's copy
   (``cast.prepared_state_dict`` re-keys them for the prepared student);
4. ``cast.decay_budget`` says whether the run is long enough for a near-lossless final prune;
5. AdamS + distillation train it (``cast.train``); every ``--save-every`` steps a distributed
   checkpoint (``torch.distributed.checkpoint``: weights, scales, AdamS state with masks, lr
   schedule) is written, and ``--resume`` continues from the newest one, bit for bit;
   ``--stop-after`` ends an invocation early (a job's time limit);
6. the final prune: ``cast.export_state_dict`` (the optimizer's masks, scales folded) is loaded
   back into the sharded student to measure its perplexity, gathered to rank 0 and written as a
   Hugging Face checkpoint (``<out>/final``) that loads without cast_ext, exactly 2:4.

Data: 1-D arrays of token ids (``.npy``, any integer dtype; memory-mapped), cut into windows of
``--seq`` tokens. Step ``s`` draws ``--batch`` x ``--grad-accum`` windows per data-parallel rank
(the ranks of a tensor-parallel group share theirs) with a generator seeded by ``s``, so a
resumed run sees the batches the uninterrupted one would. Runs on CPU (gloo) too, slowly
(``--device cpu``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import cast_ext
from cast_ext import cast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face causal LM directory")
    p.add_argument("--train", required=True, help=".npy of training token ids")
    p.add_argument("--val", help=".npy of validation token ids (perplexity)")
    p.add_argument("--out", required=True, help="checkpoints, log and the final model go here")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--seq", type=int, default=1024, help="tokens per window")
    p.add_argument("--batch", type=int, default=4, help="windows per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=10, help="warmup steps (from lr/10)")
    p.add_argument(
        "--decay-frac",
        type=float,
        default=1.0,
        help="the cosine (to lr/10) covers this last share of the steps after the warmup, the "
        "peak lr held before it (1: all of them); below 1 the pruned weights travel further "
        "(cast.decay_budget)",
    )
    p.add_argument("--decay", type=float, default=1e-3, help="AdamS's lambda (SPEC §6)")
    p.add_argument("--mask-interval", type=int, default=10)
    p.add_argument("--eta", type=float, default=1 / 3, help="KL share of the distillation loss")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--train-embeddings", action="store_true", help="default: frozen, as norms")
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=0, help="0: at the end only")
    p.add_argument("--health-every", type=int, default=10)
    p.add_argument(
        "--save-every", type=int, default=500, help="distributed checkpoint period (0: at the end)"
    )
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest ones)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute blocks in backward"
    )
    p.add_argument("--stop-after", type=int, default=None, help="steps in this invocation")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if any")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel group size (divides world)")
    p.add_argument(
        "--timeout-min",
        type=float,
        default=120.0,
        help="collective timeout: rank 0 alone loads the pretrained model and writes the final "
        "one while the others wait (NCCL's default, 10 minutes, is short for large models)",
    )
    args = p.parse_args(argv)
    for name, low in (
        ("steps", 1), ("seq", 2), ("batch", 1), ("grad_accum", 1), ("warmup", 0),
        ("mask_interval", 1), ("val_windows", 1), ("eval_every", 0), ("health_every", 0),
        ("keep", 1), ("stop_after", 1), ("tp", 1),
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0 < args.decay_frac <= 1:
        p.error(f"--decay-frac must be in (0, 1], got {args.decay_frac}")
    if args.timeout_min <= 0:
        p.error(f"--timeout-min must be > 0, got {args.timeout_min}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    return args


class Windows:
    """``[batch, seq]`` token windows of a memory-mapped 1-D id array; ``draw(step)`` is this
    rank's share of the step's global batch."""

    def __init__(self, path: str, seq: int) -> None:
        self.ids = np.load(path, mmap_mode="r")
        if self.ids.ndim != 1 or not np.issubdtype(self.ids.dtype, np.integer):
            raise ValueError(f"{path}: need a 1-D array of integer token ids")
        self.seq = seq
        self.count = len(self.ids) // seq
        if self.count < 1:
            raise ValueError(f"{path}: {len(self.ids)} tokens make no window of {seq}")

    def take(self, index: torch.Tensor) -> torch.Tensor:
        rows = [np.asarray(self.ids[i * self.seq : (i + 1) * self.seq]) for i in index.tolist()]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def draw(self, step: int, batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(self.count, (world * batch,), generator=gen)
        return self.take(index[rank * batch : (rank + 1) * batch])


def build(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture on the meta device (buffers real: no state dict holds e.g. rotary
    frequencies), embeddings tied as the config says."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


# LLaMA-family projections (LLaMA, Mistral, Qwen2, SmolLM, ...): the attention heads and the
# MLP's hidden units split over the tensor-parallel ranks, one all-reduce after o and down.
TP_STYLES = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0}
TP_STYLES |= {"o_proj": 1, "down_proj": 1}  # 0: column-wise, 1: row-wise


def tensor_parallel(model: torch.nn.Module, mesh: Any) -> None:
    """Split every LLaMA-named projection over ``mesh`` (before ``cast.prepare``: the scales
    then follow the weights' rows). A row-wise weight is cut along its input dim; AdamS takes it
    when every rank's part holds whole groups of 4 and mask bytes (in_features divisible by
    8 x the group size) and says so otherwise."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp, config = mesh.size(), model.config
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, key, None)
        if heads is not None and heads % tp:
            raise SystemExit(f"--tp {tp}: the model's {key} = {heads} does not divide by {tp}")
    plan: dict[str, Any] = {}
    for name, module in model.named_modules():
        style = TP_STYLES.get(name.rsplit(".", 1)[-1])
        if style is not None and isinstance(module, torch.nn.Linear):
            plan[name] = RowwiseParallel() if style else ColwiseParallel()
    if not plan:
        raise SystemExit(f"--tp {tp}: no LLaMA-named projections ({', '.join(TP_STYLES)})")
    parallelize_module(model, mesh, plan)


def shard(model: torch.nn.Module, mesh: Any, mp: MixedPrecisionPolicy | None) -> None:
    """fully_shard every decoder block (the model's ``_no_split_modules`` classes), then the
    root (embeddings, head, final norm)."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    kwargs: dict[str, Any] = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) params on ``device``, keeping the buffers' values."""
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in buffers.items():
            model.get_buffer(name).copy_(buf)


def trim_log(path: Path, start: int, done: bool = False) -> None:
    """Keep the records of a JSON-lines log that a run resumed at ``start`` does not write
    again: those of the steps up to ``start`` (a crashed run's later ones are redone). A
    finished run (``done``: nothing left to step) records its last health and evaluation again:
    the earlier ones of that step go."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        again = done and rec["step"] == start and rec["kind"] in ("health", "eval")
        if rec["step"] <= start and not again:
            keep.append(line + "\n")
    path.write_text("".join(keep))


def shutdown() -> NoReturn:
    """Tear the process groups down on every rank together (rank 0 may still be writing the
    model), then leave without the interpreter's teardown. The groups outlive
    ``destroy_process_group``: torch 2.14's functional collectives (DTensor, FSDP2) keep
    references to them, so gloo's worker and transport threads still run while the
    interpreter finalizes. There a rank aborted now and then after all its work was done
    ("terminate called without an active exception"): in two CI runs, none in 138 runs
    here. Every file is written and closed by now; ``os._exit`` skips that teardown."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    device = device or torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before the process group: NCCL binds to it
    timeout = datetime.timedelta(minutes=args.timeout_min)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.tp < 1 or world % args.tp:
        raise SystemExit(f"--tp {args.tp} must divide the {world} ranks")
    mesh2d = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    mesh = mesh2d["dp"]  # FSDP2 shards over the tensor-parallel groups
    dp_rank, dp_world = mesh.get_local_rank(), mesh.size()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    say = print if rank == 0 else (lambda *a, **k: None)
    latest = out / "latest"
    if latest.exists() and not args.resume:  # every rank sees it: all stop together
        raise SystemExit(
            f"{out} holds a run (checkpoint of step {latest.read_text().strip()}): pass "
            "--resume to continue it, or choose another --out"
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # 1-3: build on meta, prepare, shard, materialise, load the pretrained weights
    config = AutoConfig.from_pretrained(args.model)
    student = build(copy.deepcopy(config), torch.float32)
    teacher = build(config, torch.bfloat16 if cuda else torch.float32).requires_grad_(False)
    if args.tp > 1:
        tensor_parallel(student, mesh2d["tp"])
        tensor_parallel(teacher, mesh2d["tp"])
    layers = cast.prepare(student)
    if args.activation_checkpointing:
        # transformers >= 5.24 names it activation_checkpointing_enable (the old name warns)
        enable = getattr(student, "activation_checkpointing_enable", None)
        (enable or student.gradient_checkpointing_enable)()
        student.config.use_cache = False  # the student's own config: built from a copy
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if cuda else None
    shard(student, mesh, mp)
    shard(teacher, mesh, None)
    materialise(student, device)
    materialise(teacher, device)
    full: dict[str, torch.Tensor] = {}
    if rank == 0:
        full = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").state_dict()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(student, cast.prepared_state_dict(student, full), options=options)
    set_model_state_dict(teacher, full, options=options)
    del full
    teacher.eval()
    say(f"{len(layers)} layers to 2:4 on {world} ranks ({device.type}; {dp_world} x tp {args.tp})")

    train = Windows(args.train, args.seq)
    val = None
    if args.val:
        v = Windows(args.val, args.seq)
        val = v.take(torch.arange(min(args.val_windows, v.count)))

    def batches(start: int):
        for step in range(start, args.steps):
            drawn = train.draw(step, args.batch * args.grad_accum, dp_rank, dp_world, args.seed)
            # The step's random numbers (dropout) from the step and the data-parallel rank, so a
            # resumed run draws what the straight one did (tensor-parallel peers alike).
            torch.manual_seed((args.seed * 1_000_003 + step) * dp_world + dp_rank)
            yield from drawn.split(args.batch)

    groups = cast.param_groups(
        student, freeze_embeddings=not args.train_embeddings, freeze_norms=True
    )
    opt = cast_ext.AdamS(
        groups,
        lr=args.lr,
        decay=args.decay,
        total_steps=args.steps,
        mask_interval=args.mask_interval,
    )
    sched = cast.warmup_cosine(args.lr, args.steps, args.warmup, decay_frac=args.decay_frac)
    # The lr schedule's base (LambdaLR's "initial_lr") must be in the state to load too:
    # dcp.load fills only the keys the target already has.
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]

    def checkpoint_state() -> dict[str, Any]:
        """What a distributed checkpoint holds: weights, scales, AdamS state and groups."""
        return {
            "model": get_model_state_dict(student),
            "optim": get_optimizer_state_dict(student, opt),
        }

    start = 0
    log_path = out / "train_log.jsonl"
    if args.resume and latest.exists():
        start = int(latest.read_text())
        state = checkpoint_state()
        dcp.load(state, checkpoint_id=out / f"step-{start}")
        set_model_state_dict(student, state["model"])
        set_optimizer_state_dict(student, opt, state["optim"])
        if rank == 0:  # the records of steps the checkpoint does not hold go (they are redone)
            trim_log(log_path, start, done=start >= args.steps)
        say(f"resumed at step {start}")
    else:
        if args.resume:
            say(f"--resume: no checkpoint in {out}; starting at step 0")
        if rank == 0:
            log_path.unlink(missing_ok=True)  # a run stopped before its first checkpoint
        # 4: the preflight, from one backward's gradients
        ids = train.draw(0, args.batch, dp_rank, dp_world, args.seed).to(device)
        logits = student(ids).logits
        cast.distill_loss(logits, None, cast.shift_labels(ids), eta=0.0).backward()
        budget = cast.decay_budget(student, sched, args.steps, decay=args.decay, warn=False)
        student.zero_grad(set_to_none=True)
        say(budget)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)

    def save(step: int) -> None:
        if (args.save_every <= 0 or step % args.save_every) and step != end:
            return
        dcp.save(checkpoint_state(), checkpoint_id=out / f"step-{step}")
        dist.barrier()
        if rank == 0:
            tmp = out / "latest.tmp"
            tmp.write_text(str(step))
            tmp.replace(latest)  # atomic: a kill leaves the old or the new step
            steps = {int(d.name.split("-")[1]): d for d in out.glob("step-*")}
            older = sorted(k for k in steps if k <= step)
            # past this run's step: left by a run this one redoes (it resumed from before them)
            for k in older[: -max(args.keep, 1)] + [k for k in steps if k > step]:
                shutil.rmtree(steps[k])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        # every rank evaluates the same windows (FSDP2: all ranks run every forward)
        return {"val_ppl": cast.perplexity(model, val, batch_size=args.batch)}

    # 5: train (every rank its own windows; the losses logged are the means over the ranks)
    result = cast.train(
        student,
        opt,
        batches(start),
        total_steps=args.steps,
        lr_lambda=sched.factor,
        teacher=teacher,
        eta=args.eta,
        grad_clip=args.grad_clip,
        eval_fn=evaluate if val is not None else None,
        eval_every=args.eval_every,
        health_every=args.health_every,
        checkpoint=save,  # after the step's records: a resumed run has them all
        log_path=log_path if rank == 0 else None,
        run_name="cast",
        progress=rank == 0,
        start_step=start,
        stop_step=end,
        grad_accum=args.grad_accum,
        start_tokens=start * args.grad_accum * args.batch * args.seq,  # this rank's
    )
    if end < args.steps:
        say(f"stopped after step {end}; --resume continues")
        shutdown()

    # 6: the final prune, measured on the sharded student, then written from rank 0
    exported = cast.export_state_dict(student, opt)
    report: dict[str, Any] = {"steps": result.steps, "world": world, "tp": args.tp}
    if val is not None:
        report["val_ppl_before_prune"] = evaluate(student)["val_ppl"]
        set_model_state_dict(student, cast.prepared_state_dict(student, exported))
        report["val_ppl_after_prune"] = evaluate(student)["val_ppl"]
    dtype = getattr(torch, args.save_dtype)
    final: dict[str, torch.Tensor] = {}
    for key, value in exported.items():  # one tensor at a time: a collective on every rank
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if rank == 0:
            final[key] = whole.to("cpu", dtype)
        del whole
    if rank == 0:
        build(config, dtype).save_pretrained(out / "final", state_dict=dict(final))  # edits it
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(args.model).save_pretrained(out / "final")
        except (OSError, ValueError):
            say("no tokenizer in --model: the final checkpoint has none")
        exact = 0
        for layer in layers:
            w = final[layer.weight_name]  # an expert stack's too
            w = w.transpose(-2, -1) if layer.transposed else w  # groups run along the input dim
            exact += bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())
        report["exactly_24_layers"] = f"{exact}/{len(layers)}"
        (out / "final_report.json").write_text(json.dumps(report, indent=2))
        say(json.dumps(report, indent=2))
        say(f"wrote {out / 'final'}")
    shutdown()


if __name__ == "__main__":
    main()
