"""``python -m actavatar_lab.compare_scores A.json B.json``: two ``bench method --json`` runs on the same clips,
compared clip by clip (e.g. one model stored in fp32 and in fp16). Pooled scores of two runs differ by chance by
about 0.03 H@S on 200 phases; paired, the same clips and seeds, a real difference shows as phases that flip."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per model row present in both runs: on the clips both scored, the phases each hit, the phases that differ,
    and the mean and largest difference of per-clip mouth-audio r."""
    out: dict[str, Any] = {}
    for row, ra in a.get("model_rows", {}).items():
        rb = b.get("model_rows", {}).get(row)
        if not rb or "per_clip" not in ra or "per_clip" not in rb:
            continue
        clips_b = {c["id"]: c for c in rb["per_clip"]}
        pairs = [(c, clips_b[c["id"]]) for c in ra["per_clip"] if c["id"] in clips_b]
        phases = sum(len(ca["hits"]) for ca, _ in pairs)
        flips = sum(x != y for ca, cb in pairs for x, y in zip(ca["hits"], cb["hits"]))
        dr = [abs(ca["lipsync_corr"] - cb["lipsync_corr"]) for ca, cb in pairs
              if ca["lipsync_corr"] is not None and cb["lipsync_corr"] is not None]
        out[row] = {"clips": len(pairs), "phases": phases,
                    "hit_at_segment": [sum(sum(ca["hits"]) for ca, _ in pairs) / max(phases, 1),
                                       sum(sum(cb["hits"]) for _, cb in pairs) / max(phases, 1)],
                    "phases_that_differ": flips,
                    "lipsync_corr": [sum(ca["lipsync_corr"] or 0 for ca, _ in pairs) / max(len(pairs), 1),
                                     sum(cb["lipsync_corr"] or 0 for _, cb in pairs) / max(len(pairs), 1)],
                    "lipsync_corr_abs_diff_mean": sum(dr) / len(dr) if dr else None,
                    "lipsync_corr_abs_diff_max": max(dr) if dr else None}
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m actavatar_lab.compare_scores A.json B.json", file=sys.stderr)
        return 2
    a, b = (json.loads(Path(x).read_text()) for x in argv[1:])
    result = compare(a, b)
    if not result:
        print("No model row of A has per-clip scores in B too. Fix: compare two `actavatar bench method --json` runs "
              "of the same rows.", file=sys.stderr)
        return 2
    for row, r in result.items():
        print(f"{row}: {r['clips']} clips, {r['phases']} phases; H@S {r['hit_at_segment'][0]:.3f} vs "
              f"{r['hit_at_segment'][1]:.3f}, {r['phases_that_differ']} phases differ; mouth-audio r "
              f"{r['lipsync_corr'][0]:.3f} vs {r['lipsync_corr'][1]:.3f} (per clip: mean |diff| "
              f"{r['lipsync_corr_abs_diff_mean']:.3f}, max {r['lipsync_corr_abs_diff_max']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
