"""LoRA (Hugging Face ``peft``) on a frozen 2:4 base: adapters for ``cast_ext.nn.SparseLinear``.

PEFT knows linear layers by their ``.weight``, which a ``SparseLinear`` does not have; a config
from :func:`lora_config` (or one passed through :func:`register`) maps ``SparseLinear`` targets
to :class:`SparseLoraLinear`::

    model = cast_ext.nn.to_sparse(model)
    model = peft.get_peft_model(model, cast_ext.peft.lora_config(r=16, target_modules=[...]))

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

try:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as _LoraLinear
except ModuleNotFoundError as e:
    if e.name != "peft":
        raise
    raise ImportError(
        "cast_ext.peft needs peft: pip install peft (or pip install 'cast_ext[peft]': "
        "peft==0.21.2, the version tested)"
    ) from e

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


def register(config: LoraConfig) -> LoraConfig:
    """Map ``SparseLinear`` targets of ``config`` to :class:`SparseLoraLinear` (in place).

    For a config built elsewhere: one loaded with ``LoraConfig.from_pretrained`` for
    ``PeftModel.from_pretrained(model, path, config=register(config))``, or one for
    ``get_peft_model`` / ``add_adapter``. Other targets (dense ``nn.Linear`` layers that
    ``to_sparse`` left dense) get PEFT's own LoRA layers.

    Returns:
        ``config``.

    Raises:
        TypeError: ``config`` is not a ``peft.LoraConfig``.
        ValueError: it asks for what :class:`SparseLoraLinear` refuses (DoRA or another LoRA
            variant, ``lora_bias``, an initialisation that reads the base weight).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"cast_ext.peft.register: expected a peft.LoraConfig, got {type(config).__name__}"
        )
    why = _refusal(config)
    if why is not None:
        raise ValueError(f"cast_ext.peft.register: {why} on a SparseLinear")
    config._register_custom_module({SparseLinear: SparseLoraLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` with ``SparseLinear`` targets mapped to
    :class:`SparseLoraLinear` (see :func:`register`)."""
    return register(LoraConfig(**kwargs))
