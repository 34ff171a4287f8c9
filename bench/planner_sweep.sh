#!/usr/bin/env bash
# Planner accuracy sweep: for each cell (preset x tokens x dtype x layout)
# times the planner's candidate methods (grouped, loop) forward+backward with
# `moe bench --json`, and reports the measured fastest, the planner's pick and
# how far off the pick is (its time over the fastest's, minus 1). The kernel
# set is whatever MOE_MAX_CPU_ISA allows (export it to sweep one level).
#
# usage: bench/planner_sweep.sh [MOE_BINARY] > table.md
# environment (defaults sized for about 10 minutes at avx2 on 2 cores):
#   PRESETS="qwen3-30b-a3b"   TOKENS="64 128 256 512 1024 2048"
#   DTYPES="f32 bf16"         LAYOUTS="out_in in_out"   REPS=2
# Only qwen3-30b-a3b fits a 24 GiB machine among the large presets (the
# others' f32 weights need 5.6 to 25 GB); `tiny` adds the overhead-bound end.
# A pick that mixes methods across the two projections has no single row to
# time and is reported as "mixed" (not counted as a hit).
set -euo pipefail
MOE=${1:-build/moe}
PRESETS=${PRESETS:-qwen3-30b-a3b}
TOKENS=${TOKENS:-64 128 256 512 1024 2048}
DTYPES=${DTYPES:-f32 bf16}
LAYOUTS=${LAYOUTS:-out_in in_out}
REPS=${REPS:-2}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
start=$(date +%s)
for p in $PRESETS; do
  for t in $TOKENS; do
    for d in $DTYPES; do
      for l in $LAYOUTS; do
        if ! "$MOE" bench --preset "$p" --tokens "$t" --dtype "$d" \
               --layout "$l" --reps "$REPS" --json >>"$tmp" 2>/dev/null; then
          echo "{\"preset\":\"$p\",\"tokens\":$t,\"dtype\":\"$d\",\"layout\":\"$l\",\"failed\":true}" >>"$tmp"
        fi
      done
    done
  done
done
elapsed=$(( $(date +%s) - start ))
python3 - "$tmp" "$elapsed" "${MOE_MAX_CPU_ISA:-unset}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
cells = {}
for r in rows:
    key = (r["preset"], r["tokens"], r["dtype"], r["layout"])
    c = cells.setdefault(key, {"t": {}, "pick": None, "pred": {}, "failed": False})
    if r.get("failed"):
        c["failed"] = True
        continue
    if r["pass"] != "fwd+bwd" or r["method"] not in ("grouped", "loop"):
        continue
    c["t"][r["method"]] = r["median_ms"]
    c["pred"][r["method"]] = r["predicted_ms"]
    if r["planner_pick"]:
        c["pick"] = r["method"]
print("MOE_MAX_CPU_ISA=%s, %d cells, %d s" % (sys.argv[3], len(cells), int(sys.argv[2])))
print()
print("| preset | tokens | dtype | layout | grouped ms (pred) | loop ms (pred) | fastest | pick | pick off |")
print("|---|---|---|---|---|---|---|---|---|")
hits = n = 0
worst = 0.0
for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3])):
    c = cells[key]
    t = c["t"]
    if c["failed"] or len(t) < 2:
        print("| %s | %d | %s | %s | - | - | - | - | failed: %s |" % (key + (", ".join(sorted(t)) or "no rows",)))
        continue
    fastest = min(t, key=t.get)
    pick = c["pick"] or "mixed"
    n += 1
    off = t[pick] / t[fastest] - 1 if pick in t else float("nan")
    if pick == fastest:
        hits += 1
    if pick in t:
        worst = max(worst, off)
    fmt = lambda m: "%.1f (%.1f)" % (t[m], c["pred"][m]) if c["pred"][m] is not None else "%.1f" % t[m]
    print("| %s | %d | %s | %s | %s | %s | %s | %s | %s |" % (key + (fmt("grouped"), fmt("loop"), fastest, pick,
          "%.0f%%" % (100 * off) if off == off else "n/a")))
print()
print("picked the measured fastest in %d of %d cells (%.0f%%); worst pick %.0f%% slower than the fastest"
      % (hits, n, 100.0 * hits / max(n, 1), 100 * worst))
PY
