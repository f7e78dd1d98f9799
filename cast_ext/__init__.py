"""cast_ext: kernels and a training recipe for 2:4 sparse LLMs (CAST: AdamS, weight scaling,
distillation).

Import order matters: ``_C`` registers the C++ ops, ``ops`` adds their fake (meta) kernels and
typed wrappers, then the public API.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from ._version import __version__

try:
    from . import _C  # noqa: F401  (loads the kernels and registers the ops)
except ImportError as e:  # a missing _C is a broken install, never a silent fallback
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    _checkout = (_here.parent / "setup.py").is_file()
    # a plain (non-editable) install further down sys.path that this checkout shadows
    _installed = next(
        (
            c
            for c in (Path(p or ".").resolve() / "cast_ext" for p in sys.path)
            if c != _here and (c / "__init__.py").is_file()
        ),
        None,
    )
    raise ImportError(
        "cast_ext: the compiled extension cast_ext._C could not be loaded "
        f"({e}). "
        + (
            f"cast_ext is installed at {_installed}, but Python imported {_here} instead "
            "(the current directory comes first on sys.path): run from another directory. "
            if _checkout and _installed is not None
            else ""
        )
        + "Build it against the torch you run: "
        + (
            # imported from a source checkout, which shadows any installed copy
            f"in this checkout ({_here.parent}), "
            "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`."
            if _checkout
            else "`pip install --no-build-isolation .`."
        )
    ) from e

from . import cast, nn, ops, reference
from ._build import (
    build_info,
    cuda_kernels_available,
    cuda_value_checks,
    cusparselt_available,
    set_cuda_value_checks,
)
from .ops import (
    mask_flips,
    nm_mask,
    pack_mask,
    sparse24_compress,
    sparse24_decompress,
    sparse24_gemm,
    sparse24_mask,
    sparse24_prune,
    unpack_mask,
)
from .optim import AdamS

__all__ = [
    "AdamS",
    "__version__",
    "build_info",
    "cast",
    "cuda_kernels_available",
    "cuda_value_checks",
    "cusparselt_available",
    "mask_flips",
    "nm_mask",
    "nn",
    "ops",
    "pack_mask",
    "reference",
    "set_cuda_value_checks",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_gemm",
    "sparse24_mask",
    "sparse24_prune",
    "unpack_mask",
]
