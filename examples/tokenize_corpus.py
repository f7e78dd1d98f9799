"""Text files to the token-id array that examples/cast_fsdp2.py trains on.

    python examples/tokenize_corpus.py --model /path/to/hf_model --out train_tokens.npy \\
        corpus/*.txt

Each file is one document, tokenized with the model's own tokenizer (no special tokens added)
and followed by the end-of-sequence token; the documents are concatenated in the order given
into a 1-D ``.npy`` array (uint16 when the vocabulary fits, else uint32). The whole corpus is
held in memory: shard a very large one into several runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def tokenize(model: str, files: list[Path]) -> np.ndarray:
    """The concatenated token ids of ``files`` (each followed by EOS) as a 1-D array."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.eos_token_id is None:
        raise ValueError(f"{model}: the tokenizer has no end-of-sequence token")
    ids: list[int] = []
    for path in files:
        ids += tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.asarray(ids, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face model directory (its tokenizer)")
    p.add_argument("--out", required=True, help="the .npy to write")
    p.add_argument("files", nargs="+", type=Path, help="text files, one document each")
    args = p.parse_args(argv)
    ids = tokenize(args.model, args.files)
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"  # as np.save names it
    np.save(out, ids)
    print(f"{out}: {len(ids):,} tokens ({ids.dtype}) from {len(args.files)} files")


if __name__ == "__main__":
    main()
