"""AdamS under torch.distributed (CPU, gloo, 2 processes): DDP, FSDP2 (``fully_shard``, DTensor
params sharded on dim 0) and distributed checkpointing, each against a single-process run on the
full batch; and the refusal of DTensor layouts that would cut an N:M group (SPEC §5: a silent
fallback to plain Adam is the failure to guard against).

Every worker is spawned once per test; rank 0 gathers what it compares (params, masks, states)
and writes it to a file the test reads back.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_close_trained
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import cast_ext
from cast_ext import AdamS, cast

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
STEPS = 20
SPLIT = 9  # the checkpoint test saves after this many steps (between refreshes: 9 % 4 != 0)
# Several refreshes (t = 0, 4, 8, 12, 16) and a decay large enough that masks move the weights.
HP: dict[str, Any] = {
    "lr": 1e-2,
    "weight_decay": 0.01,
    "decay": 5e-3,
    "total_steps": STEPS,
    "mask_interval": 4,
}
# Reduction order differs from one process summing the full batch: fp32 rounding, amplified a
# little by Adam's normalisation over 20 steps; trained tensors also get LOOSE_ATOL for a few
# elements (conftest.assert_close_trained).
RTOL, ATOL, LOOSE_ATOL = 1e-5, 1e-6, 2e-5


def make_model() -> nn.Sequential:
    """Three 2:4-eligible Linears (one with an odd out-features, so dim-0 shards are uneven) and
    their biases (dense)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5)
    )


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 5, generator=gen)


def train(model: nn.Module, opt: AdamS, steps: range, rank: int = 0, world: int = 1) -> None:
    """Mean-squared error on this rank's slice of each full batch (the whole batch if world=1)."""
    for s in steps:
        x, y = batch(s)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        versions = [p._version for p in model.parameters()]
        opt.step()
        # every param stepped has a new version, a DTensor's too (not only its local shard's)
        assert all(
            p._version > v for p, v in zip(model.parameters(), versions, strict=True)
        ) or not isinstance(opt, AdamS)


def snapshot(model: nn.Module, opt: AdamS) -> dict[str, dict[str, Tensor]]:
    """Per param name: the param and its state, as full plain tensors (DTensors gathered)."""

    def full(t: Tensor) -> Tensor:
        if isinstance(t, dist.tensor.DTensor):
            t = t.full_tensor()
        return t.detach().clone()

    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        out[name] = {"param": full(p), **{k: full(v) for k, v in opt.state[p].items()}}
    return out


def reference(steps: int = STEPS) -> dict[str, dict[str, Tensor]]:
    model = make_model()
    opt = AdamS(model.parameters(), **HP)
    train(model, opt, range(steps))
    return snapshot(model, opt)


def assert_match(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    n_masks = 0
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key, w in want[name].items():
            g = got[name][key]
            msg = f"{name} {key}"
            if key in ("mask", "prev_mask", "step"):
                assert torch.equal(g, w), msg  # masks and step counts exactly
                n_masks += key == "mask"
            else:
                assert_close_trained(g, w, rtol=RTOL, atol=ATOL, loose_atol=LOOSE_ATOL, msg=msg)
    assert n_masks == 3  # the three weights were stepped as sparse params, not plain Adam


def assert_identical(got: dict, want: dict, what: str) -> None:
    """Two snapshots equal bit for bit, every param and state entry."""
    for name, entries in want.items():
        for key, val in entries.items():
            assert torch.equal(got[name][key], val), f"{what}: {name} {key}"


def dcp_save(model: nn.Module, opt: AdamS, path: str) -> None:
    """A distributed checkpoint of the model and the optimizer (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)


def dcp_load(model: nn.Module, opt: AdamS, path: str) -> None:
    """dcp_save's checkpoint into ``model`` and ``opt`` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _init(rank: int, tmp: str, world: int = WORLD) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
    )


def _ddp_worker(rank: int, tmp: str) -> dict[str, Any]:
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = AdamS(model.parameters(), **HP)
    train(model, opt, range(STEPS), rank, WORLD)
    files = {"ddp": snapshot(model, opt)}
    # Every rank holds the same replica.
    w = model.module[0].weight.detach().clone()
    ws = [torch.empty_like(w) for _ in range(WORLD)]
    dist.all_gather(ws, w)
    assert torch.equal(ws[0], ws[1])

    # AdamS inside ZeroRedundancyOptimizer (each rank steps a share of the params, then
    # broadcasts them): it builds one AdamS per rank from the groups and keeps them in step
    # one for one, so AdamS must not add groups of its own.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zmodel = nn.parallel.DistributedDataParallel(make_model())
    zero = ZeroRedundancyOptimizer(zmodel.parameters(), optimizer_class=AdamS, **HP)
    train(zmodel, zero, range(STEPS), rank, WORLD)  # type: ignore[arg-type]
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        zstate = zero.state_dict()["state"]
        files["zero"] = {
            name: {"param": p.detach().clone(), **zstate[i]}
            for i, (name, p) in enumerate(zmodel.module.named_parameters())
        }
    return files


def _fsdp_model(
    model: nn.Module | None = None, mesh_shape: tuple[int, ...] = (WORLD,)
) -> nn.Module:
    """``model`` (default: a fresh make_model()) with each Linear and the root fully_shard-ed;
    a 2-D ``mesh_shape`` is HSDP (replicated over the first mesh dim, sharded over the second)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard")[-len(mesh_shape) :]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = make_model() if model is None else model
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_worker(rank: int, tmp: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Shard

    # 20 steps straight.
    model = _fsdp_model()
    opt = AdamS(model.parameters(), **HP)
    w0 = model[0].weight
    assert isinstance(w0, DTensor) and w0.placements == (Shard(0),)
    train(model, opt, range(STEPS), rank, WORLD)
    st = opt.state[w0]
    # State is laid out like its param; the mask shards the same rows.
    assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].placements == (Shard(0),)
    assert isinstance(st["mask"], DTensor) and st["mask"].shape == (32, 2)
    assert st["mask"].to_local().shape[0] == w0.to_local().shape[0]
    snap = snapshot(model, opt)

    # SPLIT steps, distributed checkpoint of model + optimizer on both ranks.
    model = _fsdp_model()
    opt = AdamS(model.parameters(), **HP)
    train(model, opt, range(SPLIT), rank, WORLD)
    dcp_save(model, opt, f"{tmp}/ckpt")
    mid = snapshot(model, opt)
    del model, opt

    # Fresh model and optimizer (different init), load on both ranks, continue.
    torch.manual_seed(1234)
    model = _fsdp_model()
    for p in model.parameters():
        p.data.normal_()
    opt = AdamS(model.parameters(), **HP)
    dcp_load(model, opt, f"{tmp}/ckpt")
    loaded = snapshot(model, opt)
    train(model, opt, range(SPLIT, STEPS), rank, WORLD)
    resumed = snapshot(model, opt)
    return {"fsdp": {"straight": snap, "mid": mid, "loaded": loaded, "resumed": resumed}}


def prepared_with_teacher(build: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """build() prepared for CAST (learnable scales, 2 blocks per row) and a perturbed dense
    build() as the teacher."""
    teacher = build().requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model = build()
    cast.prepare(model, scale_blocks=2)
    return model, teacher


def make_cast_model() -> tuple[nn.Module, nn.Module]:
    """make_model() (its three Linears prepared) and its teacher."""
    return prepared_with_teacher(make_model)


def train_cast(
    model: nn.Module,
    teacher: nn.Module,
    opt: AdamS,
    rank: int = 0,
    world: int = 1,
    steps: range = range(STEPS),
) -> None:
    """The distillation loss (KL to the teacher + CE) on this rank's slice of each full batch."""
    for s in steps:
        x, y = batch(s)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        with torch.no_grad():
            t = teacher(x[rows])
        cast.distill_loss(model(x[rows]), t, y[rows].argmax(-1)).backward()
        opt.step()


HEALTH_AT = 15  # health signals here and at the end: a refresh (t = 16) lies between


def cast_health_run(
    model: nn.Module, teacher: nn.Module, opt: AdamS, rank: int = 0, world: int = 1
) -> dict[str, float]:
    """train_cast, with cast.sparsity_health at HEALTH_AT and at the end (mask flips between)."""
    train_cast(model, teacher, opt, rank, world, range(HEALTH_AT))
    _, packed = cast.sparsity_health(model, opt)
    train_cast(model, teacher, opt, rank, world, range(HEALTH_AT, STEPS))
    return cast.sparsity_health(model, opt, packed)[0]


def cast_reference() -> dict[str, Any]:
    model, teacher = make_cast_model()
    opt = AdamS(cast.param_groups(model), **HP)
    health = cast_health_run(model, teacher, opt)
    exported = cast.export_state_dict(model, opt)
    return {**snapshot(model, opt), "exported": exported, "health": health}


def _cast_worker(rank: int, tmp: str) -> dict[str, Any]:
    """The CAST recipe (prepare, param_groups, distill_loss, AdamS) under DDP, then FSDP2, with
    sparsity_health, and export_state_dict (finalize refused) on the FSDP2 model."""
    model, teacher = make_cast_model()
    opt = AdamS(cast.param_groups(model), **HP)
    ddp = nn.parallel.DistributedDataParallel(model)
    train_cast(ddp, teacher, opt, rank, WORLD)
    ddp_snap = snapshot(ddp, opt)
    del ddp, model, opt
    gc.collect()
    model, teacher = make_cast_model()
    model = _fsdp_model(model)
    opt = AdamS(cast.param_groups(model), **HP)
    health = cast_health_run(model, teacher, opt, rank, WORLD)
    fsdp_snap = snapshot(model, opt)
    # The plain 2:4 model's state from the sharded one: DTensor weights, gathered here.
    exported = {
        k: v.full_tensor() if isinstance(v, dist.tensor.DTensor) else v.clone()
        for k, v in cast.export_state_dict(model, opt).items()
    }
    with pytest.raises(ValueError, match="finalize: layer '0' has a sharded"):
        cast.finalize(model, opt)
    return {"cast": {"ddp": ddp_snap, "fsdp": fsdp_snap, "exported": exported, "health": health}}


VOCAB = 11


def lm() -> nn.Module:
    """A tiny causal LM: an embedding, then make_model()'s stack over VOCAB logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 16), *make_model()[:-1], nn.Linear(24, VOCAB))


def make_lm() -> tuple[nn.Module, nn.Module]:
    """lm() prepared for CAST, and its teacher."""
    return prepared_with_teacher(lm)


def lm_batches(rank: int = 0, world: int = 1) -> Iterator[Tensor]:
    """STEPS batches of 4 x 6 token ids, this rank's rows of each."""
    for s in range(STEPS):
        ids = torch.randint(VOCAB, (4, 6), generator=torch.Generator().manual_seed(200 + s))
        yield ids[rank * 4 // world : (rank + 1) * 4 // world]


def accumulated_run(rank: int = 0, world: int = 1, ddp: bool = False) -> dict:
    """cast.train on lm(): one batch per step (this rank's rows), or with ddp, under DDP in
    micro-batches of one row (grad_accum = rows per rank), which all-reduce the gradients once
    a step (the micro-batches before the last run under no_sync, forward and backward: DDP
    decides in the forward)."""
    model, teacher = make_lm()
    opt = AdamS(cast.param_groups(model), **HP)
    rows = 4 // world
    batches: Any = lm_batches(rank, world)
    trained: nn.Module = model
    allreduces = []
    if ddp:
        batches = (row[None] for b in batches for row in b)
        trained = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)  # one bucket

        def counted(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
            allreduces.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        trained.register_comm_hook(None, counted)
    cast.train(
        trained,
        opt,
        batches,
        total_steps=STEPS,
        teacher=teacher,
        health_every=0,
        progress=False,
        grad_accum=rows if ddp else 1,
    )
    assert len(allreduces) == (STEPS if ddp else 0), len(allreduces)
    return snapshot(model, opt)


def own_rows_losses(rank: int, world: int, ddp: bool = False) -> list[float]:
    """The losses cast.train records on this rank's rows of lm_batches; with ddp, under DDP over
    a group of this rank alone (every rank builds every group): its means are its group's, this
    rank's own, not the world's."""
    model, teacher = make_lm()
    opt = AdamS(cast.param_groups(model), **HP)
    if ddp:
        groups = [dist.new_group([r]) for r in range(world)]
        model = nn.parallel.DistributedDataParallel(model, process_group=groups[rank])
    res = cast.train(
        model,
        opt,
        lm_batches(rank, world),
        total_steps=STEPS,
        teacher=teacher,
        health_every=0,
        progress=False,
    )
    return [rec["loss"] for rec in res.train]


def budget_then_train(model: nn.Module, teacher: nn.Module, rank: int = 0, world: int = 1) -> dict:
    """decay_budget (gradients from one backward on the first batch), then cast.train with
    distillation, grad clipping that bites, an lr schedule and health records."""
    ids = next(lm_batches(rank, world))
    cast.distill_loss(model(ids), None, cast.shift_labels(ids), eta=0.0).backward()
    budget = cast.decay_budget(model, 1e-2, STEPS, decay=HP["decay"], warn=False).to_dict()
    model.zero_grad(set_to_none=True)
    opt = AdamS(cast.param_groups(model), **HP)
    res = cast.train(
        model,
        opt,
        lm_batches(rank, world),
        total_steps=STEPS,
        lr_lambda=lambda s: 1.0 - s / (2 * STEPS),
        teacher=teacher,
        grad_clip=0.2,
        health_every=5,
        progress=False,
    )
    return {"budget": budget, "train": res.train, "health": res.health, **snapshot(model, opt)}


def _dtensor_worker(rank: int, tmp: str) -> dict[str, Any]:
    """The mask ops on DTensors (their sharding rules), then decay_budget and the reference
    training loop cast.train on an FSDP2 model built the large-model way: on the meta device,
    prepared, sharded, materialised, and loaded from the plain model's full state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(3)
    for k in (16, 24):
        # 7 rows: uneven shards on dim 0. Rows of 16 split over 2 ranks into whole groups
        # and mask bytes; rows of 24 do not (12 elements: half a byte).
        a, b = torch.randn(2, 7, 3, k, generator=gen)
        pa, pb = cast_ext.pack_mask(cast_ext.sparse24_mask(a)), cast_ext.pack_mask(b > 0)
        values, meta = cast_ext.sparse24_compress(a)

        def every_op(
            a: Tensor, pa: Tensor, pb: Tensor, values: Tensor, meta: Tensor, k: int = k
        ) -> dict:
            v, m = cast_ext.sparse24_compress(a)
            return {
                "sparse24_mask": cast_ext.sparse24_mask(a),
                "nm_mask": cast_ext.nm_mask(a, 2, 8),
                "sparse24_prune": cast_ext.sparse24_prune(a),
                "compress_values": v,
                "compress_meta": m,
                "sparse24_decompress": cast_ext.sparse24_decompress(values, meta),
                "pack_mask": cast_ext.pack_mask(cast_ext.sparse24_mask(a)),
                "unpack_mask": cast_ext.unpack_mask(pa, k),
                "mask_flips": cast_ext.mask_flips(pa, pb),
            }

        inputs = (a, pa, pb, values, meta)
        want = every_op(*inputs)
        for placement in (Shard(0), Shard(1), Shard(2), Replicate()):
            got = every_op(*(distribute_tensor(t, mesh, [placement]) for t in inputs))
            # Sharded on a leading dim, or on the last in whole groups and bytes: computed
            # on the local shards, no gather (Partial for the sum of flips); a last-dim
            # split that would cut them, or unpack_mask's (its last_dim is the row's): the
            # input gathered first.
            local = placement in (Shard(0), Shard(1)) or (placement == Shard(2) and k == 16)
            for name, want_t in want.items():
                expected = placement if local else Replicate()
                if name == "mask_flips" and local:
                    expected = Partial()
                if name == "unpack_mask" and placement == Shard(2):
                    expected = Replicate()
                assert got[name].placements == (expected,), (name, k, placement, got[name])
                assert torch.equal(got[name].full_tensor(), want_t), (name, k, placement)

    with torch.device("meta"):
        model = lm()
    cast.prepare(model, scale_blocks=2)
    model = _fsdp_model(model).to_empty(device="cpu")
    full = cast.prepared_state_dict(model, lm().state_dict())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    result = budget_then_train(model, make_lm()[1], rank, WORLD)
    result["ddp_accumulated"] = accumulated_run(rank, WORLD, ddp=True)
    result["ddp_subgroup"] = own_rows_losses(rank, WORLD, ddp=True)
    _fewer_rows_than_ranks(mesh)
    return {"dtensor": result}


def _fewer_rows_than_ranks(mesh: Any) -> None:
    """A prepared layer of one output row under FSDP2 (rank 1's shard empty): the mask op's
    sharding rule made its magnitude mask Replicate, which sparsity_health combined with the
    local shards (wrong figures), cast.train's health records then failed in mask_flips, and
    export_state_dict could not apply it. The mask is laid out like the weight now."""
    from torch.distributed.fsdp import fully_shard

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 1), nn.Linear(1, VOCAB))
        cast.prepare(model, filter_fn=lambda name, _: name == "1")
        return model

    plain, sharded = build(), fully_shard(build(), mesh=mesh)
    want, got = cast.sparsity_health(plain)[0], cast.sparsity_health(sharded)[0]
    assert got["pruned_kept_ratio"] == pytest.approx(want["pruned_kept_ratio"], rel=1e-6)
    exported = cast.export_state_dict(sharded)["1.weight"].full_tensor()
    assert torch.equal(exported, cast.export_state_dict(plain)["1.weight"])
    opt = AdamS(cast.param_groups(sharded), lr=1e-2, total_steps=4)
    ids = [
        torch.randint(VOCAB, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(4)
    ]
    cast.train(sharded, opt, ids, total_steps=4, health_every=2, progress=False)


def _hsdp_worker(rank: int, tmp: str) -> dict[str, Any]:
    """budget_then_train on 4 ranks under HSDP: a 2 x 2 mesh, params replicated over the first
    mesh dim and sharded over the second (placements (Replicate(), Shard(0)))."""
    from torch.distributed.tensor import Replicate, Shard

    model, teacher = make_lm()
    model = _fsdp_model(model, mesh_shape=(2, 2))
    w = cast.sparse_layers(model)[0].weight
    assert w.placements == (Replicate(), Shard(0)), w.placements
    return {"hsdp": budget_then_train(model, teacher, rank, 4)}


def _tp_model(mesh: Any) -> nn.Module:
    """lm() under tensor parallelism, then prepared: its first Linear column-wise (weight and
    scale rows sharded), its second row-wise (weight Shard(1): each rank holds half of every
    row's groups; scale replicated)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = lm()
    parallelize_module(model, mesh, {"1": ColwiseParallel(), "3": RowwiseParallel()})
    cast.prepare(model, scale_blocks=2)
    return model


def lm_steps(model: nn.Module, opt: AdamS, steps: range) -> None:
    """Plain next-token training of lm() on the whole of each batch (every TP rank sees it)."""
    for s in steps:
        ids = torch.randint(VOCAB, (4, 6), generator=torch.Generator().manual_seed(200 + s))
        opt.zero_grad()
        cast.distill_loss(model(ids), None, cast.shift_labels(ids), eta=0.0).backward()
        opt.step()


def _tp_worker(rank: int, tmp: str) -> dict[str, Any]:
    """Tensor parallelism on 2 ranks (_tp_model): the layouts, a refused split, budget_then_train,
    and a distributed checkpoint saved mid-run and resumed bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    plain, teacher = make_lm()
    model = _tp_model(mesh)
    placements = [
        (getattr(lay.weight, "placements", None), getattr(lay.scale, "placements", None))
        for lay in cast.sparse_layers(model)
    ]  # the head stays a plain layer
    assert placements == [
        ((Shard(0),), (Shard(0),)),
        ((Shard(1),), (Replicate(),)),
        (None, None),
    ]
    ids = next(lm_batches())
    torch.testing.assert_close(model(ids), plain(ids), rtol=RTOL, atol=ATOL)
    # A row-wise split that would cut groups or mask bytes (24 columns: 12 a rank) is
    # refused, by name and rule, before anything is written.
    w = torch.randn(8, 24)
    cut = nn.Parameter(distribute_tensor(w, mesh, [Shard(1)]))
    with pytest.raises(ValueError, match=r"sharded 2 ways: that cuts .* multiple of") as info:
        AdamS([cut], **HP)
    assert "param 0 of group 0 of shape [8, 24]" in str(info.value)
    with pytest.raises(ValueError, match="sharded 2 ways"):
        AdamS([{"params": [cut], "sparse": True}], **HP)
    AdamS([{"params": [cut], "sparse": False}], **HP)  # dense: elementwise Adam
    files = {"tp": budget_then_train(model, teacher)}

    # Distributed checkpoint after SPLIT steps (masks sharded on their byte columns), loaded
    # into a fresh, perturbed model and optimizer: continues as the uninterrupted run.
    model = _tp_model(mesh)
    opt = AdamS(cast.param_groups(model), **HP)
    lm_steps(model, opt, range(STEPS))
    straight = snapshot(model, opt)
    mask = opt.state[cast.sparse_layers(model)[1].weight]["mask"]
    assert mask.placements == (Shard(1),) and mask.to_local().shape == (24, 2)

    model = _tp_model(mesh)
    opt = AdamS(cast.param_groups(model), **HP)
    lm_steps(model, opt, range(SPLIT))
    dcp_save(model, opt, f"{tmp}/tp_ckpt")
    mid = snapshot(model, opt)
    torch.manual_seed(1234)
    model = _tp_model(mesh)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt = AdamS(cast.param_groups(model), **HP)
    dcp_load(model, opt, f"{tmp}/tp_ckpt")
    assert_identical(snapshot(model, opt), mid, "loaded")
    lm_steps(model, opt, range(SPLIT, STEPS))
    assert_identical(snapshot(model, opt), straight, "resumed")

    # One process's run of the same steps: the same params, states and masks, and the same
    # exported 2:4 checkpoint (DTensors laid out like the params, gathered here).
    ref, _ = make_lm()
    ref_opt = AdamS(cast.param_groups(ref), **HP)
    lm_steps(ref, ref_opt, range(STEPS))
    assert_match(straight, snapshot(ref, ref_opt))
    # AdamS's health figures: the whole param's, summed over the shards (a collective)
    stats, want_stats = opt.sparsity_stats(), ref_opt.sparsity_stats()
    names = {p: n for n, p in model.named_parameters()}
    ref_names = {n: p for n, p in ref.named_parameters()}
    assert len(stats) == len(want_stats) == 3
    for p, got_st in stats.items():
        want_st = want_stats[ref_names[names[p]]]
        assert got_st["mask_flips"] == want_st["mask_flips"] is not None, names[p]
        assert_record_close(got_st, want_st)
    exported = cast.export_state_dict(model, opt)
    want = cast.export_state_dict(ref, ref_opt)
    assert exported.keys() == want.keys()
    for key, value in want.items():
        got = exported[key]
        got = got.full_tensor() if isinstance(got, dist.tensor.DTensor) else got
        torch.testing.assert_close(got, value, rtol=RTOL, atol=ATOL, msg=key)
    return files


def _fsdp_tp_worker(rank: int, tmp: str) -> dict[str, Any]:
    """budget_then_train on 4 ranks in 2-D: tensor parallel within pairs of ranks (_tp_model on
    the "tp" mesh dim), FSDP2 over the pairs (each Linear and the root sharded on "dp"); each dp
    rank gets its rows of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    _, teacher = make_lm()
    model = _tp_model(mesh["tp"])
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    w = cast.sparse_layers(model)[1].weight
    assert w.placements == (Shard(0), Shard(1)), w.placements
    return {"fsdp_tp": budget_then_train(model, teacher, mesh["dp"].get_local_rank(), 2)}


MOE_VOCAB, MOE_STEPS = 32, 8


def moe_lm() -> nn.Module:
    """A one-layer transformers Mixtral: 4 experts, their weights two 3-D stacks."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=MOE_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg)


def moe_run(rank: int = 0, world: int = 1) -> dict[str, Any]:
    """CAST on moe_lm (FSDP2 over its decoder layer and the root when world > 1): its rank's
    rows of each batch; then the exported 2:4 state (gathered) and the health figures."""
    model, teacher = prepared_with_teacher(moe_lm)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.model.layers[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = AdamS(cast.param_groups(model), **{**HP, "total_steps": MOE_STEPS, "mask_interval": 2})
    for s in range(MOE_STEPS):
        x = torch.randint(0, MOE_VOCAB, (8, 12), generator=torch.Generator().manual_seed(s))
        x = x[rank * 8 // world : (rank + 1) * 8 // world]
        opt.zero_grad()
        with torch.no_grad():
            t = teacher(x).logits
        cast.distill_loss(model(x).logits, t, cast.shift_labels(x)).backward()
        opt.step()
    exported = {
        k: v.full_tensor() if isinstance(v, dist.tensor.DTensor) else v.detach().clone()
        for k, v in cast.export_state_dict(model, opt).items()
    }
    return {"exported": exported, "health": cast.sparsity_health(model, opt)[0]}


def _moe_worker(rank: int, tmp: str) -> dict[str, Any]:
    return {"moe": moe_run(rank, WORLD)}


def _worker(rank: int, tmp: str, body: Callable[[int, str], dict[str, Any]], world: int) -> None:
    """One spawned rank: the process group, ``body(rank, tmp)``, then rank 0 saves each entry of
    what it returned as ``<tmp>/<name>.pt``. The body's models and optimizers are gone when it
    returns, so nothing (a DDP reducer and its autograd hooks) holds the group when every rank
    meets at the barrier and the group goes: tearing both down together at exit aborted a worker
    now and then ("terminate called without an active exception"). A rank that succeeded then
    leaves without the interpreter's teardown, as examples/cast_fsdp2.py does (its shutdown
    says why): functional collectives keep the groups, and gloo's threads, alive past it."""
    _init(rank, tmp, world)
    try:
        files = body(rank, tmp)
        if rank == 0:
            for name, obj in files.items():
                torch.save(obj, f"{tmp}/{name}.pt")
        del files
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(body: Callable[[int, str], dict[str, Any]], tmp: Path, nprocs: int = WORLD) -> None:
    """Runs ``body`` on ``nprocs`` gloo ranks (see _worker)."""
    # Workers import this file by module name (spawn re-imports it): tests/ must be importable.
    here = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *sys.path, old])
    try:
        torch.multiprocessing.spawn(
            _worker, args=(str(tmp), body, nprocs), nprocs=nprocs, join=True
        )
    finally:
        os.environ["PYTHONPATH"] = old


def test_ddp_and_zero_match_single_process(tmp_path: Path) -> None:
    _spawn(_ddp_worker, tmp_path)
    want = reference()
    assert_match(torch.load(tmp_path / "ddp.pt"), want)
    assert_match(torch.load(tmp_path / "zero.pt"), want)


def test_fsdp2_matches_single_process_and_dcp_resumes(tmp_path: Path) -> None:
    _spawn(_fsdp_worker, tmp_path)
    got = torch.load(tmp_path / "fsdp.pt")
    assert_match(got["straight"], reference())
    # The checkpoint restored every param and state entry (masks, steps) exactly ...
    assert_identical(got["loaded"], got["mid"], "loaded")
    # ... and the resumed run is the uninterrupted one, bit for bit (same processes, same ops).
    assert_identical(got["resumed"], got["straight"], "resumed")


def test_cast_recipe_under_ddp_and_fsdp2_matches_single_process(tmp_path: Path) -> None:
    """prepare's scales and original weights (both parametrization params, sharded on dim 0 by
    FSDP2), the distillation loss and AdamS's param groups train as on one process."""
    _spawn(_cast_worker, tmp_path)
    got, want = torch.load(tmp_path / "cast.pt"), cast_reference()
    exported, health = want.pop("exported"), want.pop("health")
    assert any("scale" in name for name in want)
    assert_match(got["ddp"], want)
    assert_match(got["fsdp"], want)
    # export_state_dict on the FSDP2 model: the single process's export, gathered
    assert sorted(got["exported"]) == sorted(exported)
    for key, value in exported.items():
        g = got["exported"][key]
        assert_close_trained(g, value, rtol=RTOL, atol=ATOL, loose_atol=LOOSE_ATOL, msg=key)
    # sparsity_health on the FSDP2 model: figures over all shards, as on one process
    assert got["health"].keys() == health.keys() and health["mask_flips"] > 0, health
    for key, value in health.items():
        assert got["health"][key] == pytest.approx(value, rel=1e-5), key


def test_cast_on_moe_expert_stacks_under_fsdp2_matches_single_process(tmp_path: Path) -> None:
    """A Mixtral's expert stacks prepared ([experts, out, in] parametrized weights and
    [experts, out, blocks] scales, sharded on the experts dim by FSDP2) train and export as on
    one process, exactly 2:4 per expert."""
    pytest.importorskip("transformers")
    _spawn(_moe_worker, tmp_path)
    got, want = torch.load(tmp_path / "moe.pt"), moe_run()
    stacks = [k for k in want["exported"] if k.endswith(("gate_up_proj", "down_proj"))]
    assert len(stacks) == 2 and sorted(got["exported"]) == sorted(want["exported"])
    # Attention's softmax and Adam's normalisation spread the reduction-order noise further than
    # in the MLPs above: up to 9e-6 here, on 2-6% of the attention weights' elements.
    for key, value in want["exported"].items():
        g = got["exported"][key]
        assert_close_trained(g, value, rtol=RTOL, atol=LOOSE_ATOL, loose_atol=LOOSE_ATOL, msg=key)
    for key in stacks:
        nonzero = (got["exported"][key] != 0).reshape(-1, 4).sum(-1)
        assert bool((nonzero <= 2).all()), key
    assert got["health"].keys() == want["health"].keys()
    for key, value in want["health"].items():
        assert got["health"][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


def assert_record_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Floats within fp32 reduction-order tolerance (NaN equal to NaN), the rest exactly."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
        else:
            assert got[key] == value, key


def test_mask_ops_on_dtensors_and_cast_train_under_fsdp2(tmp_path: Path) -> None:
    """The mask ops run on DTensors (checked inside the workers); decay_budget and cast.train
    on an FSDP2 model, and cast.train with gradient accumulation under DDP, give what one
    process gives on the full batch."""
    _spawn(_dtensor_worker, tmp_path)
    got = torch.load(tmp_path / "dtensor.pt")
    # DDP with gradient accumulation (no_sync but for the last micro-batch): one process's run
    assert_match(got.pop("ddp_accumulated"), accumulated_run())
    # DDP over a subgroup (rank 0 alone): rank 0's losses are its rows' (not the world's mean)
    assert got.pop("ddp_subgroup") == pytest.approx(own_rows_losses(0, WORLD), rel=1e-6)
    assert_same_run(got)


def test_cast_train_under_hsdp_matches_single_process(tmp_path: Path) -> None:
    """HSDP (replicated shards): AdamS, the health signals (a replica's figures counted once),
    decay_budget and cast.train as on one process."""
    _spawn(_hsdp_worker, tmp_path, nprocs=4)
    assert_same_run(torch.load(tmp_path / "hsdp.pt"))


def test_cast_train_under_tensor_parallel_matches_single_process(tmp_path: Path) -> None:
    """Tensor parallel (ColwiseParallel, RowwiseParallel) before prepare: the scales follow the
    weights' rows, AdamS steps the column shards of a row-wise weight (whole groups on each
    rank), and decay_budget, the health signals and cast.train give one process's results."""
    _spawn(_tp_worker, tmp_path)
    assert_same_run(torch.load(tmp_path / "tp.pt"))


def test_cast_train_under_fsdp2_with_tensor_parallel_matches_single_process(
    tmp_path: Path,
) -> None:
    """2-D parallelism (FSDP2 over tensor-parallel pairs, 4 ranks) as on one process."""
    _spawn(_fsdp_tp_worker, tmp_path, nprocs=4)
    assert_same_run(torch.load(tmp_path / "fsdp_tp.pt"))


def assert_same_run(got: dict) -> None:
    """A distributed budget_then_train result against one process's on the full batch."""
    model, teacher = make_lm()
    want = budget_then_train(model, teacher)
    # decay_budget gathers each weight and gradient: the same verdict on every rank as here
    budget = want.pop("budget")
    assert budget["momentum_source"] == "the current gradients"
    assert_record_close(got.pop("budget"), budget)
    # grad clipping bit (the norm is global over the shards) and the same steps were taken
    g_train, w_train = got.pop("train"), want.pop("train")
    assert all(r["grad_norm"] > 0.2 for r in w_train)
    for g, w in zip(g_train, w_train, strict=True):
        # the losses logged are means over the ranks: the full batch's, as one process logs
        for key in ("grad_norm", "loss", "ce", "kl"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), key
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)
    g_health, w_health = got.pop("health"), want.pop("health")
    assert [h["step"] for h in g_health] == [h["step"] for h in w_health] == [0, 5, 10, 15, 20]
    for g, w in zip(g_health, w_health, strict=True):
        assert_record_close(g, w)
    assert_match(got, want)


# ---- layouts that would cut a group: refused, on one spawned rank (a world of one) ----------


def _refusals_worker(rank: int, tmp: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    one_rank = init_device_mesh("cpu", (1,))

    w = torch.randn(8, 16)

    def param(*placements: Any) -> nn.Parameter:
        return nn.Parameter(distribute_tensor(w.clone(), one_rank, list(placements)))

    partial = nn.Parameter(DTensor.from_local(w.clone(), one_rank, [Partial()]))
    with pytest.raises(ValueError, match="Partial placement") as info:
        AdamS([partial], **HP)
    msg = str(info.value)
    assert "cast_ext.AdamS: param 0 of group 0 of shape [8, 16]" in msg, msg
    # Not demoted to a dense group either when the split is automatic or explicit.
    with pytest.raises(ValueError, match="Partial placement"):
        AdamS([{"params": [partial], "sparse": True}], **HP)
    # (A last-dim split that cuts groups needs 2 ranks: _tp_worker checks it.)

    # Layouts that keep groups whole (a one-way split of the last dim cuts nothing) step on the
    # local shard, exactly like a plain tensor.
    for placements in ((Shard(0),), (Replicate(),), (Shard(1),)):
        p, q = param(*placements), nn.Parameter(w.clone())
        opt_p, opt_q = AdamS([p], **HP), AdamS([q], **HP)
        for s in range(6):
            g = torch.randn(8, 16, generator=torch.Generator().manual_seed(s))
            p.grad = distribute_tensor(g, one_rank, list(placements))
            q.grad = g
            opt_p.step()
            opt_q.step()
        assert torch.equal(p.full_tensor(), q.detach())
        assert torch.equal(opt_p.state[p]["mask"].full_tensor(), opt_q.state[q]["mask"])
        assert torch.equal(opt_p.mask(p).full_tensor(), opt_q.mask(q))

    # A param swapped in after construction (e.g. re-sharded by a wrapper) is checked again at
    # the step, before anything is written.
    opt = AdamS([param(Shard(0))], **HP)
    bad = nn.Parameter(DTensor.from_local(w.clone(), one_rank, [Partial()]))
    bad.grad = torch.ones_like(bad)
    opt.param_groups[0]["params"][0] = bad
    with pytest.raises(ValueError, match="Partial placement"):
        opt.step()
    assert not opt.state[bad]
    assert torch.equal(bad.full_tensor(), w)

    # An expert stack that is a DTensor already (expert parallel): prepare refuses it by name,
    # before it changes anything.
    class Experts(nn.Module):
        is_transposed = False

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(distribute_tensor(torch.randn(2, 8, 16), one_rank, [Shard(0)]))

    net = nn.Sequential(nn.Linear(16, 16), Experts())
    with pytest.raises(ValueError, match=r"1\.w is an expert stack \[2, 8, 16\] that is already"):
        cast.prepare(net)
    assert not cast.sparse_layers(net) and not net[1]._forward_pre_hooks
    return {}


def test_dtensor_layouts_that_split_groups_are_refused(tmp_path: Path) -> None:
    # In a spawned rank, not here: the gloo group's threads would outlive the test (see _worker).
    _spawn(_refusals_worker, tmp_path, nprocs=1)
