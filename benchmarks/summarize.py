"""Print the ratios of a pytest-benchmark JSON: each impl against the others of its group.

Usage: ``python -m benchmarks.summarize benchmarks/results/cpu.json``
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

__all__ = ["summarize"]


def summarize(path: str) -> list[str]:
    """Lines of ``group: impl median_ms (x vs each other impl)`` for a pytest-benchmark file."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b["params"].get("impl", b["name"]) if b.get("params") else b["name"]
        groups[b["group"]][impl] = b["stats"]["median"]
    info = data["machine_info"]
    lines = [f"{info.get('cpu', {}).get('brand_raw', '')} {data['datetime']}"]
    if "cast_ext_cpu_isa" in info:  # files written since the instruction sets were recorded
        caps = " ".join(f"{k}={v}" for k, v in info.get("isa_caps", {}).items()) or "none"
        lines.append(
            f"kernels: cast_ext {info['cast_ext_cpu_isa']}, torch "
            f"{info['torch_cpu_capability']}; caps: {caps}"
        )
    for group, impls in sorted(groups.items()):
        lines.append(f"{group}:")
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            others = ", ".join(f"{t / u:.2f}x {o}" for o, u in sorted(impls.items()) if o != impl)
            lines.append(f"  {impl:<22} {t * 1e3:10.2f} ms   time vs: {others}")
    return lines


if __name__ == "__main__":
    print("\n".join(summarize(sys.argv[1])))
