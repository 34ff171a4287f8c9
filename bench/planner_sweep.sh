#!/usr/bin/env bash
# Planner accuracy sweep: for each cell (preset x tokens x dtype x layout x
# projection) times the planner's two methods (grouped, loop) and reports the
# measured fastest, the planner's pick and how far off the pick is (its time
# over the fastest's, minus 1). The kernel set is whatever MOE_MAX_CPU_ISA
# allows (export it to sweep one level).
#
# usage: bench/planner_sweep.sh BUILD_DIR > table.md
#
# Each cell also shows the planner's predicted time of each method against
# the measured one (MODE=cpu: fwd + bwd of the projection, its three GEMMs).
#
# MODE=cpu (default): one thread, the expert GEMMs of each projection
#   (forward, dX, dW) through bench_gemm_cpu, timed in process CPU time. On a
#   machine shared with other jobs this is what an idle core would take; wall
#   time is not (other jobs moved wall times 5-10x on the development VM).
#   The planner is asked for its pick at one thread (`moe plan --threads 1`).
# MODE=wall: `moe bench --json` per cell, whole layer, both projections on
#   the same method (a pick that mixes methods is reported as "mixed").
#
# environment: PRESETS="qwen3-30b-a3b tiny"  TOKENS="64 256 1024 4096"
#   DTYPES="f32 bf16"  LAYOUTS="out_in in_out"  REPS=1
#   BEFORE=PATH (MODE=cpu): also ask the planner with MOE_MACHINE=PATH (e.g.
#   older constants) and score its picks against the same timings, so that
#   two sets of constants are compared on one measurement.
#   BEFORE_MOE=PATH/moe (MODE=cpu): the same with another build's planner
#   (an older cost model), its picks and predictions beside this one's.
# Presets whose f32 weights fit a 24 GiB machine: qwen3-30b-a3b, tiny.
set -euo pipefail
B=${1:-build}
MODE=${MODE:-cpu}
PRESETS=${PRESETS:-qwen3-30b-a3b tiny}
TOKENS=${TOKENS:-64 256 1024 4096}
DTYPES=${DTYPES:-f32 bf16}
LAYOUTS=${LAYOUTS:-out_in in_out}
REPS=${REPS:-1}
BEFORE=${BEFORE:-}
dims() {
  case $1 in
  qwen3-30b-a3b) echo "128 2048 768 8" ;;
  tiny) echo "8 64 32 2" ;;
  mixtral-8x7b) echo "8 4096 14336 2" ;;
  deepseek-v3) echo "256 7168 2048 8" ;;
  qwen3.5-397b-a17b) echo "512 4096 1024 10" ;;
  *) echo "unknown preset $1" >&2; exit 2 ;;
  esac
}
BEFORE_MOE=${BEFORE_MOE:-}
# The predictions (fwd + bwd = the projection's three GEMMs), per projection
# and method, from `moe plan --explain`: "gate_up grouped 1.234 2.345;..."
preds_awk='/^(gate_up|down):/ {p=$1; sub(":","",p)}
  /^  (grouped|loop): +predicted/ {m=$1; sub(":","",m);
    printf "%s %s %s %s;", p, m, $3, $6}'
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
start=$(date +%s)
for p in $PRESETS; do
  for t in $TOKENS; do
    for d in $DTYPES; do
      for l in $LAYOUTS; do
        if [ "$MODE" = wall ]; then
          "$B/moe" bench --preset "$p" --tokens "$t" --dtype "$d" \
            --layout "$l" --reps "$REPS" --json >>"$tmp" 2>/dev/null ||
            echo "{\"preset\":\"$p\",\"tokens\":$t,\"dtype\":\"$d\",\"layout\":\"$l\",\"failed\":true}" >>"$tmp"
          continue
        fi
        plan=$(OMP_NUM_THREADS=1 "$B/moe" plan --preset "$p" --tokens "$t" \
          --dtype "$d" --layout "$l" --threads 1 --explain)
        picks=${plan%%$'\n'*} # (not `| head -1`: SIGPIPE under pipefail)
        # The predictions (fwd + bwd = the projection's three GEMMs), per
        # projection and method: "gate_up grouped 1.234 2.345;..."
        preds=$(echo "$plan" | awk "$preds_awk")
        before=""
        bpreds=""
        if [ -n "$BEFORE" ] || [ -n "$BEFORE_MOE" ]; then
          bplan=$(MOE_MACHINE=${BEFORE:-${MOE_MACHINE:-}} OMP_NUM_THREADS=1 \
            "${BEFORE_MOE:-$B/moe}" plan --preset "$p" --tokens "$t" \
            --dtype "$d" --layout "$l" --threads 1 --explain)
          before=${bplan%%$'\n'*}
          bpreds=$(echo "$bplan" | awk "$preds_awk")
        fi
        for m in grouped loop; do
          out=$(OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 BENCH_METHOD=$m \
            "$B/bench_gemm_cpu" "$t" "$d" "$l" "$REPS" $(dims "$p") 2>&1 |
            grep '^proj_ms' || true)
          echo "{\"preset\":\"$p\",\"tokens\":$t,\"dtype\":\"$d\",\"layout\":\"$l\",\"method\":\"$m\",\"proj\":\"$out\",\"picks\":\"$picks\",\"preds\":\"$preds\",\"bpreds\":\"$bpreds\",\"before\":\"$before\"}" >>"$tmp"
        done
      done
    done
  done
done
elapsed=$(($(date +%s) - start))
python3 - "$tmp" "$elapsed" "${MOE_MAX_CPU_ISA:-unset}" "$MODE" <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
mode = sys.argv[4]
cells = {}
for r in rows:
    base = (r["preset"], r["tokens"], r["dtype"], r["layout"])
    if mode == "wall":
        c = cells.setdefault(base + ("layer",), {"t": {}, "pick": None})
        if r.get("failed") or r["pass"] != "fwd+bwd" or r["method"] not in ("grouped", "loop"):
            continue
        c["t"][r["method"]] = r["median_ms"]
        if r["planner_pick"]:
            c["pick"] = r["method"]
        continue
    m = re.match(r"proj_ms gate_up ([0-9.]+) down ([0-9.]+)", r["proj"])
    pk = re.search(r"gate_up -> (\w+), down -> (\w+)", r["picks"])
    for i, proj in enumerate(("gate_up", "down")):
        c = cells.setdefault(base + (proj,), {"t": {}, "pick": None, "before": None})
        pb = re.search(r"gate_up -> (\w+), down -> (\w+)", r.get("before", ""))
        if pb:
            c["before"] = pb.group(i + 1)
        if m:
            c["t"][r["method"]] = float(m.group(i + 1))
        for key, name in (("preds", "pred"), ("bpreds", "bpred")):
            for pr in r.get(key, "").split(";"):
                f = pr.split()
                if len(f) == 4 and f[0] == proj:
                    c.setdefault(name, {})[f[1]] = float(f[2]) + float(f[3])
        if pk:
            c["pick"] = pk.group(i + 1)
print("MOE_MAX_CPU_ISA=%s, MODE=%s, %d cells, %d s" % (sys.argv[3], mode, len(cells), int(sys.argv[2])))
print()
hasb = any(c.get("before") for c in cells.values())
hasbp = any(c.get("bpred") for c in cells.values())
print("| preset | tokens | dtype | layout | projection | grouped ms | loop ms | fastest | pick | pick off |"
      " grouped pred (err) | loop pred (err) |"
      + (" before pick | before off |" if hasb else "")
      + (" before grouped pred (err) | before loop pred (err) |" if hasbp else ""))
print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if hasb else "")
      + ("---|---|" if hasbp else ""))
errs = {"pred": [], "bpred": []}  # (|predicted / measured - 1|, error, method)


def pred_col(c, t, meth, which="pred"):
    p = c.get(which, {}).get(meth)
    if p is None or meth not in t or not t[meth] > 0:
        return "-"
    e = p / t[meth] - 1
    errs[which].append((abs(e), e, meth))
    return "%.3f (%+.0f%%)" % (p, 100 * e)
score = {"pick": [0, 0, 0.0], "before": [0, 0, 0.0]}  # hits, cells, worst


def judge(t, pick, which):
    if len(t) == 1 and pick in t:  # the other method cannot run here
        score[which][0] += 1
        score[which][1] += 1
        return "0% (only method)"
    fastest = min(t, key=t.get)
    off = t[pick] / t[fastest] - 1 if pick in t else float("nan")
    score[which][1] += 1
    score[which][0] += pick == fastest
    if off == off:
        score[which][2] = max(score[which][2], off)
    return "%.0f%%" % (100 * off) if off == off else "n/a"


for key in sorted(cells):
    c, t = cells[key], cells[key]["t"]
    if not t or (len(t) < 2 and (c["pick"] or "mixed") not in t):
        print("| %s | %d | %s | %s | %s | - | - | - | - | not measured | - | - |" % key)
        continue
    fastest = min(t, key=t.get)
    pick = c["pick"] or "mixed"
    row = "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |" % (key + (
        "%.3f" % t["grouped"] if "grouped" in t else "n/a",
        "%.3f" % t["loop"] if "loop" in t else "n/a", fastest, pick,
        judge(t, pick, "pick")))
    row += " %s | %s |" % (pred_col(c, t, "grouped"), pred_col(c, t, "loop"))
    if hasb:
        b = c.get("before") or "mixed"
        row += " %s | %s |" % (b, judge(t, b, "before"))
    if hasbp:
        row += " %s | %s |" % (pred_col(c, t, "grouped", "bpred"),
                               pred_col(c, t, "loop", "bpred"))
    print(row)
print()
for which in (("pick", "before") if hasb else ("pick",)):
    h, n, w = score[which]
    print("%s: picked the measured fastest in %d of %d cells (%.0f%%); worst pick %.0f%% slower than the fastest"
          % ("planner" if which == "pick" else "before (" + "BEFORE constants)", h, n, 100.0 * h / max(n, 1), 100 * w))
for which, label in (("pred", "predictions"), ("bpred", "before's predictions")):
    e = errs[which]
    if e:
        within = sum(1 for a, _, _ in e if a <= 0.15)
        worst = max(e)
        print("%s: within 15%% of the measured time in %d of %d (cell, method) pairs; worst %+.0f%% (%s)"
              % (label, within, len(e), 100 * worst[1], worst[2]))
PY
