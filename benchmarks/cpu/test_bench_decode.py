"""Greedy decoding on the CPU: a 2:4 model through ``SparseLinear`` against the same model dense.

The demo's model, SmolLM2-135M-Instruct (from the demo's cache; skipped when the cache is
absent: ``python -m cast_ext demo`` fills it), or in quick mode a small random LLaMA. Its
layers are pruned to 2:4 by magnitude (``cast_ext.demo.magnitude_prune``), so both runs hold
the same weights; then the model is either left with its ``nn.Linear`` layers ("dense") or
has them swapped by ``cast_ext.nn.to_sparse`` in auto mode ("sparselinear_auto": per shape the
packed kernel or dense, whichever ran faster in the model's first calls, in the warm-up round).
One round: 32 new tokens after a 16-token prompt, greedy, with the KV cache, through
``generate`` as a user would call it. The embeddings and the (tied) head stay dense in both.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import QUICK, run

import cast_ext

NEW_TOKENS = 32
PROMPT = 16


def _base() -> torch.nn.Module:
    if QUICK:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    from cast_ext import demo

    if not (demo.cache_root() / "smollm2-135m-instruct" / "model.safetensors").is_file():
        pytest.skip("the demo's model cache is absent (python -m cast_ext demo fills it)")
    return demo.load_smollm2(verbose=False)[0]


@pytest.fixture(scope="module")
def pruned() -> tuple[torch.nn.Module, set[str]]:
    pytest.importorskip("transformers")
    from cast_ext import demo

    model = _base()
    _, masks = demo.magnitude_prune(model)  # plain nn.Linear layers again, exactly 2:4
    return model, set(masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["dense", "sparselinear_auto"])
def test_decode(benchmark, pruned, impl: str, dtype: torch.dtype) -> None:
    benchmark.group = f"greedy decode {'tiny LLaMA' if QUICK else 'SmolLM2-135M'} {dtype}"
    base, names = pruned
    model = copy.deepcopy(base).to(dtype)
    if impl == "sparselinear_auto":
        cast_ext.nn.to_sparse(model, filter_fn=lambda name, m: name in names)
        kinds = [type(m).__name__ for m in model.modules()]
        assert kinds.count("SparseLinear") == len(names)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator())

    @torch.no_grad()
    def decode() -> torch.Tensor:
        return model.generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip

    out = run(benchmark, decode, rounds=3)
    assert out.shape == (1, PROMPT + NEW_TOKENS)
    benchmark.extra_info.update({"new_tokens": NEW_TOKENS, "layers_2to4": len(names)})
