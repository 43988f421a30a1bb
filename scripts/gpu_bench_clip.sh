#!/usr/bin/env bash
# Issue 27's GPU figures, in one run: `actavatar bench clip` at the 5B shape (704x1280, 121 frames, 40 steps, text and
# audio guidance; random weights, nothing to download) in every memory mode, phase guidance once in the fastest mode,
# and the bundled mini model's demo as a smoke test. Everything lands under $OUT: one JSON and one log per run,
# nvidia-smi.txt, demo.mp4 and summary.json (+ the table printed at the end: time, time per step, peak memory per mode,
# the ratio to the full-load time and the issue's targets).
#
#   bash scripts/gpu_bench_clip.sh                      # all modes, 40 steps
#   STEPS=10 bash scripts/gpu_bench_clip.sh             # shorter: the summary extrapolates to 40 steps per step time
#   MODES="full offload" bash scripts/gpu_bench_clip.sh # a subset
#   BENCH_ARGS="--tiny" bash scripts/gpu_bench_clip.sh  # a dry run of the script itself on a CPU, in seconds
#
# Env: OUT (default runs/gpu_bench_clip), PYTHON (default .venv/bin/python, else python3), MODES, STEPS,
# BENCH_ARGS (extra bench options), RUN_TIMEOUT (seconds per bench run, default 900), SKIP_DEMO=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench_clip}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODES=${MODES:-full fp8 offload fp8-offload auto}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
mkdir -p "$OUT"
(nvidia-smi || echo "no nvidia-smi") > "$OUT/nvidia-smi.txt" 2>&1
steps=()
[ -n "${STEPS:-}" ] && steps=(--steps "$STEPS")
status=0
for mode in $MODES; do
  echo "=== bench clip --memory-mode $mode"
  timeout "$RUN_TIMEOUT" "$PYTHON" -m actavatar_core.cli bench clip --memory-mode "$mode" "${steps[@]}" ${BENCH_ARGS:-} \
    --json "$OUT/clip_$mode.json" 2>&1 | tee "$OUT/clip_$mode.log"
  rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "bench clip $mode: exit $rc"; status=1; }
done
fastest=$("$PYTHON" - "$OUT" $MODES <<'PY'
import json, sys, pathlib
out, modes = pathlib.Path(sys.argv[1]), sys.argv[2:]
runs = {m: json.loads((out / f"clip_{m}.json").read_text()) for m in modes if (out / f"clip_{m}.json").is_file()}
print(min(runs, key=lambda m: runs[m]["total_seconds"]) if runs else "full")
PY
)
echo "=== bench clip --memory-mode $fastest --phase-cfg 2 (4 passes a step)"
timeout "$RUN_TIMEOUT" "$PYTHON" -m actavatar_core.cli bench clip --memory-mode "$fastest" --phase-cfg 2 "${steps[@]}" \
  ${BENCH_ARGS:-} --json "$OUT/clip_${fastest}_phase.json" 2>&1 | tee "$OUT/clip_${fastest}_phase.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if [ "${SKIP_DEMO:-0}" != 1 ]; then
  echo "=== demo (bundled mini model, memory mode auto)"
  timeout "$RUN_TIMEOUT" "$PYTHON" -m actavatar_core.cli demo --out "$OUT/demo.mp4" 2>&1 | tee "$OUT/demo.log"
  [ "${PIPESTATUS[0]}" = 0 ] && [ -s "$OUT/demo.mp4" ] || { echo "demo failed"; status=1; }
fi
"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("clip_*.json")):
    r = json.loads(f.read_text())
    per_step, steps = r["steps"]["median_seconds"] or 0.0, r["shape"]["steps"]
    at40 = r["total_seconds"] - r["stages"]["sampling"]["seconds"] + 40 * per_step if steps != 40 else r["total_seconds"]
    rows[f.stem.removeprefix("clip_")] = {
        "card": r["device_name"], "mode": r["memory"]["mode"], "passes": r["shape"]["passes_per_step"],
        "steps": steps, "total_s": round(r["total_seconds"], 1), "total_at_40_steps_s": round(at40, 1),
        "step_s": round(per_step, 3), "sampling_s": round(r["stages"]["sampling"]["seconds"], 1),
        "decode_s": round(r["stages"]["vae_decode"]["seconds"], 1),
        "peak_gb": None if r["peak_gb"] is None else round(r["peak_gb"], 2),
        "peak_reserved_gb": max((s.get("peak_reserved_gb") or 0) for s in r["stages"].values()) or None,
        "fallbacks": r["memory"]["fallbacks"]}
full = rows.get("full", {}).get("total_at_40_steps_s")
for row in rows.values():
    row["x_full"] = round(row["total_at_40_steps_s"] / full, 2) if full else None
three = [r for k, r in rows.items() if not k.endswith("_phase")]
fits = lambda gb, ratio: [k for k, r in rows.items() if r["peak_reserved_gb"] and r["peak_reserved_gb"] < gb
                          and r["x_full"] is not None and r["x_full"] <= ratio]
summary = {"runs": rows, "targets": {
    "fastest_5s_720p_under_180s": min((r["total_at_40_steps_s"] for r in three), default=None),
    "modes_under_12gb_within_1.3x_full": fits(12, 1.3), "modes_under_8gb_within_2x_full": fits(8, 2.0)}}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"{'run':<18}{'card':<26}{'steps':>6}{'total s':>9}{'@40 s':>8}{'step s':>8}{'peak GB':>9}{'resv GB':>9}{'x full':>8}")
for k, r in rows.items():
    print(f"{k:<18}{r['card'][:25]:<26}{r['steps']:>6}{r['total_s']:>9}{r['total_at_40_steps_s']:>8}{r['step_s']:>8}"
          f"{str(r['peak_gb']):>9}{str(r['peak_reserved_gb'] and round(r['peak_reserved_gb'], 2)):>9}{str(r['x_full']):>8}")
print(json.dumps(summary["targets"]))
PY
exit $status
