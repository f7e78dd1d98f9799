"""LoRA (Hugging Face ``peft``) on a frozen 2:4 base: adapters for ``cast_ext.nn.SparseLinear``.

PEFT knows linear layers by their ``.weight``, which a ``SparseLinear`` does not have; a config
from :func:`lora_config` (or one passed through :func:`register`) maps ``SparseLinear`` targets
to :class:`SparseLoraLinear`::

    model = cast_ext.nn.to_sparse(model)
    model = peft.get_peft_model(model, cast_ext.peft.lora_config(r=16, target_modules=[...]))

``target_modules="all-linear"`` needs the model (PEFT's own expansion lists ``nn.Linear`` and
``Conv1D`` layers only): ``lora_config(model=model, target_modules="all-linear", ...)``.

Saved adapters are plain LoRA adapters; to load one onto a ``to_sparse`` model, register the
saved config::

    config = cast_ext.peft.register(peft.LoraConfig.from_pretrained(path))
    model = peft.PeftModel.from_pretrained(model, path, config=config)

Not supported on a ``SparseLinear``: DoRA, ``lora_bias``, the other LoRA variants,
initialisations that read the base weight (PiSSA, OLoRA, LoftQ, ...), and merging (``W_2:4 + B A``
is not 2:4; merge on the dense model that ``cast_ext.nn.to_dense`` gives).

Importing this module needs ``peft`` (``import cast_ext`` never imports it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

try:
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import Linear as _LoraLinear
    from peft.tuners.tuners_utils import (
        BaseTuner,
        BaseTunerLayer,
        _maybe_include_all_linear_layers,
    )
    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TaskType
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES
except ModuleNotFoundError as e:
    if e.name != "peft":
        raise
    raise ImportError(
        "cast_ext.peft needs peft: pip install peft (or pip install 'cast_ext[peft]': "
        "peft==0.21.2, the version tested)"
    ) from e

from transformers import PreTrainedModel

from .nn import SparseLinear

__all__ = ["SparseLoraLinear", "lora_config", "register"]

# init_lora_weights values that neither read nor rewrite the base layer's weight
_INITS = (True, False, "gaussian")


def _refusal(config: LoraConfig) -> str | None:
    """Why ``config`` cannot put an adapter on a ``SparseLinear``, or None."""
    if config.use_dora:
        return (
            "DoRA (use_dora=True) is not supported: it normalises the dense W + B A, and a "
            "SparseLinear holds no dense weight"
        )
    variants = [
        f"{f.name}={getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.metadata.get("is_lora_variant") and getattr(config, f.name)
    ]
    if variants:
        return f"LoRA variants are not supported (plain LoRA only): {', '.join(variants)}"
    if config.lora_bias:
        return (
            "lora_bias=True is not supported: lora_B's bias is there to be merged into the base "
            "layer, and merging into a 2:4 base is refused"
        )
    if config.init_lora_weights not in _INITS:
        return (
            f"init_lora_weights={config.init_lora_weights!r} is not supported (it reads or "
            "rewrites the base layer's dense .weight, which a SparseLinear does not have); use "
            "True, False or 'gaussian'"
        )
    return None


class SparseLoraLinear(_LoraLinear):
    """PEFT's LoRA ``Linear`` on a frozen :class:`~cast_ext.nn.SparseLinear`:
    ``y = base(x) + sum over active adapters of B(A(dropout(x))) * scaling``.

    Everything but merging is PEFT's own ``lora.Linear``: several adapters, ``set_adapter``,
    ``disable_adapter()``, per-sample ``adapter_names=``, rank-stabilised scaling
    (``use_rslora``), adapter dtypes (a bf16 base gets fp32 adapters under
    ``autocast_adapter_dtype``, PEFT's default; the input is cast to the adapter's dtype and
    the sum back to the base output's), ``unload()`` (the ``SparseLinear`` comes back untouched).
    The base's gradient reaches only the input, and its bias where the config's ``bias=`` trains
    it.

    Refused with a ValueError naming the layer: DoRA, ``lora_bias``, the other LoRA variants,
    initialisations that read the base weight, and ``merge`` (so ``merge_adapter`` and
    ``merge_and_unload`` too). Built by PEFT from a config that :func:`register` prepared.
    """

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any
    ) -> None:
        self.target_name = kwargs.get("target_name", "")
        why = _refusal(config)
        if why is not None:
            raise ValueError(f"{self._where()}: adapter {adapter_name!r}: {why}")
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _get_in_out_features(self, module: SparseLinear) -> tuple[int, int]:
        return module.in_features, module.out_features  # PEFT would warn of an unknown layer

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"{self._where()}: cannot merge a LoRA adapter into a 2:4 base (W_2:4 + B A is not "
            "2:4); for a dense merged model, save the adapter, then on the base model made dense "
            "(unload(), cast_ext.nn.to_dense) load it with PeftModel.from_pretrained and "
            "merge_and_unload()"
        )

    def _where(self) -> str:
        return f"cast_ext.peft.SparseLoraLinear: layer {self.target_name!r}"


def _asks_all_linear(config: LoraConfig) -> bool:
    t = config.target_modules
    return isinstance(t, str) and t.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def _expand_all_linear(config: LoraConfig, model: nn.Module) -> None:
    """Set ``config.target_modules`` to PEFT's expansion of ``"all-linear"`` (its ``nn.Linear``,
    ``Conv1D`` and adapter layers) plus the ``SparseLinear`` layers, which PEFT does not list,
    left out by PEFT's rules: the output head of a ``transformers`` model (a sequence
    classifier's ``score``/``classifier`` where it has none) and the layers inside adapters.
    A ``PeftModel`` (for ``add_adapter``) is named from the model it wraps, as PEFT does."""
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    sparse = {name for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    sparse -= {
        f"{prefix}.{suffix}"
        for prefix, m in model.named_modules()
        if isinstance(m, BaseTunerLayer)
        for suffix, _ in m.named_modules()
        if suffix
    }
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and config.task_type == TaskType.SEQ_CLS:
            heads = (getattr(model, n, None) for n in SEQ_CLS_HEAD_NAMES)
            head = next((h for h in heads if h is not None), None)
        sparse -= {name for name, m in model.named_modules() if m is head}
    _maybe_include_all_linear_layers(config, model)
    config.target_modules = set(config.target_modules) | sparse


def register(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """Map ``SparseLinear`` targets of ``config`` to :class:`SparseLoraLinear` (in place).

    For a config built elsewhere: one loaded with ``LoraConfig.from_pretrained`` for
    ``PeftModel.from_pretrained(model, path, config=register(config))``, or one for
    ``get_peft_model`` / ``add_adapter``. Other targets (dense ``nn.Linear`` layers that
    ``to_sparse`` left dense) get PEFT's own LoRA layers.

    Args:
        config: the ``peft.LoraConfig``.
        model: the model the adapter goes on; needed for ``target_modules="all-linear"``, which
            becomes the names of its ``SparseLinear`` layers besides those PEFT lists (its
            ``nn.Linear`` and ``Conv1D`` layers), all but the output head.

    Returns:
        ``config``.

    Raises:
        TypeError: ``config`` is not a ``peft.LoraConfig``, or ``model`` not an ``nn.Module``.
        ValueError: it asks for what :class:`SparseLoraLinear` refuses (DoRA or another LoRA
            variant, ``lora_bias``, an initialisation that reads the base weight), or for
            ``"all-linear"`` without ``model``. ``config`` is left unchanged.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"cast_ext.peft.register: expected a peft.LoraConfig, got {type(config).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"cast_ext.peft.register: model must be an nn.Module, got {type(model).__name__}"
        )
    why = _refusal(config)
    if why is not None:
        raise ValueError(f"cast_ext.peft.register: {why} on a SparseLinear")
    if _asks_all_linear(config):
        if model is None:
            raise ValueError(
                f"cast_ext.peft.register: target_modules={config.target_modules!r} needs the "
                "model (register(config, model) or lora_config(model=model, ...)): PEFT expands "
                "it to nn.Linear and Conv1D layers only, so no SparseLinear would get an adapter"
            )
        _expand_all_linear(config, model)
    config._register_custom_module({SparseLinear: SparseLoraLinear})
    return config


def lora_config(*, model: nn.Module | None = None, **kwargs: Any) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` with ``SparseLinear`` targets mapped to
    :class:`SparseLoraLinear`; ``model`` is needed for ``target_modules="all-linear"`` (see
    :func:`register`)."""
    return register(LoraConfig(**kwargs), model)
