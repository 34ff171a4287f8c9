#!/usr/bin/env python3
"""`moe layer` against an independent float64 NumPy Qwen3-MoE reference.

usage: test_reference.py PATH/TO/moe

Checks, for shapes the C tests do not use: output, router_logits and every
gradient within 1e-5 (f32) / 2e-2 (bf16) relative Frobenius error, on every
weight layout, every method, norm_topk_prob on and off; --strict on every
layout; bitwise-equal results across layouts (grouped pinned), thread
counts and runs. The reference backward is itself checked against central
finite differences first. Prints one line per check and ends with
"N passed, M failed".
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_ref  # noqa: E402
import st  # noqa: E402

from checks import Checks

GRADS = ["grad.hidden_states", "grad.gate.weight",
         "grad.experts.gate_up_proj", "grad.experts.down_proj"]
TOL = {"F32": 1e-5, "BF16": 2e-2}
LAYOUTS = [(g, d) for g in ("out_in", "in_out") for d in ("out_in", "in_out")]
METHODS = ["auto", "grouped", "loop"]
MIN_MARGIN = 1e-3  # logit gap between the k-th and (k+1)-th expert

check = Checks()


def rel_err(got, ref):
    ref = np.asarray(ref, np.float64)
    d = np.linalg.norm(np.asarray(got, np.float64) - ref)
    n = np.linalg.norm(ref)
    return d / n if n > 0 else d


def topk_margin(logits, k):
    """Smallest gap between the k-th and (k+1)-th largest logit per token."""
    if k >= logits.shape[1]:
        return np.inf
    s = -np.sort(-logits, axis=1)
    return float(np.min(s[:, k - 1] - s[:, k]))


# -------------------------------------------------------------- reference FD
def finite_difference_checks():
    """The hand-written backward against central differences of forward."""
    rng = np.random.default_rng(7)
    for (T, E, H, I, k, norm) in [(4, 5, 6, 3, 2, True),
                                  (5, 4, 7, 4, 3, False),
                                  (3, 3, 5, 2, 3, True)]:
        while True:
            x = rng.standard_normal((T, H))
            wg = rng.standard_normal((E, H)) * 1.5 / np.sqrt(H)
            if topk_margin(x @ wg.T, k) > 1e-2:
                break
        wgu = rng.standard_normal((E, 2 * I, H)) / np.sqrt(H)
        wd = rng.standard_normal((E, H, I)) / np.sqrt(I)
        go = rng.standard_normal((T, H))
        args = {"x": x, "wg": wg, "wgu": wgu, "wd": wd}
        _, g = moe_ref.backward(x, wg, wgu, wd, k, norm, go)

        def loss(a):
            o = moe_ref.forward(a["x"], a["wg"], a["wgu"], a["wd"], k, norm)
            return float(np.sum(o["output"] * go))

        for key, gname in [("x", "grad.hidden_states"), ("wg", "grad.gate.weight"),
                           ("wgu", "grad.experts.gate_up_proj"),
                           ("wd", "grad.experts.down_proj")]:
            worst = 0.0
            for _ in range(6):
                idx = tuple(int(rng.integers(0, s)) for s in args[key].shape)
                eps = 1e-6
                a = {n: v.copy() for n, v in args.items()}
                a[key][idx] += eps
                lp = loss(a)
                a[key][idx] -= 2 * eps
                lm = loss(a)
                fd = (lp - lm) / (2 * eps)
                an = g[gname][idx]
                worst = max(worst, abs(fd - an) / max(1.0, abs(an)))
            check("reference fd T=%d E=%d H=%d I=%d k=%d norm=%d %s" %
                  (T, E, H, I, k, norm, gname), worst < 1e-6,
                  "max scaled |fd - analytic| = %.2e" % worst)


# ------------------------------------------------------------ CLI plumbing
def run_cli(moe, inp, out, method, backward=True, strict=False, threads=None):
    cmd = [moe, "layer", "--in", inp, "--out", out, "--method", method]
    if backward:
        cmd.append("--backward")
    if strict:
        cmd.append("--strict")
    if threads is not None:
        cmd += ["--threads", str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None, "timed out: " + " ".join(cmd)
    if p.returncode != 0:
        return None, "exit %d: %s\n  command: %s" % (
            p.returncode, p.stderr.strip(), " ".join(cmd))
    try:
        return st.read(out), None
    except Exception as e:  # noqa: BLE001 - report, not crash
        return None, "cannot read %s: %s" % (out, e)


def refused_up_front(err):
    """The reason when the CLI refused a pinned method at plan creation
    because its library cannot run here (e.g. oneDNN without bf16 on this
    CPU, or not in this build); None for any other failure."""
    if err and "MOE_ERR_UNIMPLEMENTED" in err and "cannot serve" in err:
        return err.split("\n")[0]
    return None


def make_inputs(rng, T, E, H, I, k, mode=None):
    """Random non-zero inputs, routing drawn so no near-tie sits at the top-k
    boundary (checked on the bf16-rounded values too)."""
    for _ in range(1000):
        x = rng.standard_normal((T, H))
        if mode == "one_expert":
            # Every token leans on one direction that expert 2 owns.
            u = rng.standard_normal(H)
            u /= np.linalg.norm(u)
            x = x * 0.3 + 3.0 * u
            wg = rng.standard_normal((E, H)) * 0.3 / np.sqrt(H)
            wg[2] += 1.0 * u  # p(expert 2) ~ 0.8: f32 well conditioned
        else:
            wg = rng.standard_normal((E, H)) * 2.0 / np.sqrt(H)
        if mode == "one_expert" and np.any(np.argmax(x @ wg.T, axis=1) != 2):
            continue
        if (topk_margin(x @ wg.T, k) > MIN_MARGIN and
                topk_margin(st.bf16_round(x) @ st.bf16_round(wg).T, k) > MIN_MARGIN):
            break
    else:
        raise RuntimeError("could not draw tie-free routing")
    return {
        "hidden_states": x,
        "gate.weight": wg,
        "experts.gate_up_proj": rng.standard_normal((E, 2 * I, H)) / np.sqrt(H),
        "experts.down_proj": rng.standard_normal((E, H, I)) / np.sqrt(I),
        "grad_output": rng.standard_normal((T, H)),
    }


def to_file(logical, gu_layout, down_layout):
    """Logical arrays -> arrays in the file's layout."""
    f = dict(logical)
    if gu_layout == "in_out":
        f["experts.gate_up_proj"] = np.transpose(logical["experts.gate_up_proj"], (0, 2, 1))
    if down_layout == "in_out":
        f["experts.down_proj"] = np.transpose(logical["experts.down_proj"], (0, 2, 1))
    return f


def to_logical(name, arr, gu_layout, down_layout):
    if ((name == "grad.experts.gate_up_proj" and gu_layout == "in_out") or
            (name == "grad.experts.down_proj" and down_layout == "in_out")):
        return np.transpose(arr, (0, 2, 1))
    return arr


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def same_bits(a, b):
    return set(a) == set(b) and all(
        a[n][1].shape == b[n][1].shape and np.array_equal(bits(a[n][1]), bits(b[n][1]))
        for n in a)


class Case:
    def __init__(self, tmp, rng, T, E, H, I, k, norm, mode=None, pad=0):
        self.tmp, self.T, self.E, self.H, self.I, self.k = tmp, T, E, H, I, k
        self.norm, self.mode, self.pad = norm, mode, pad
        self.base = make_inputs(rng, T, E, H, I, k, mode)
        self.ref = {}
        for dt in ("F32", "BF16"):
            # The reference sees exactly the values the file holds.
            lg = {n: (st.bf16_round(v) if dt == "BF16"
                      else v.astype(np.float32).astype(np.float64))
                  for n, v in self.base.items()}
            f, g = moe_ref.backward(lg["hidden_states"], lg["gate.weight"],
                                    lg["experts.gate_up_proj"],
                                    lg["experts.down_proj"], k, norm,
                                    lg["grad_output"])
            self.ref[dt] = (f, g)
        self.ambiguous_gu = H == 2 * I
        self.ambiguous_down = H == I

    def tag(self, dt, gl, dl):
        return "T=%d E=%d H=%d I=%d k=%d norm=%s %s gate_up=%s down=%s%s%s" % (
            self.T, self.E, self.H, self.I, self.k,
            "true" if self.norm else "false", dt.lower(), gl, dl,
            " " + self.mode if self.mode else "",
            " misaligned" if self.pad else "")

    def write(self, dt, gl, dl, always_meta=False):
        arrs = to_file(self.base, gl, dl)
        meta = {"top_k": str(self.k),
                "norm_topk_prob": "true" if self.norm else "false"}
        if self.ambiguous_gu or always_meta:
            meta["gate_up_layout"] = gl
        if self.ambiguous_down or always_meta:
            meta["down_layout"] = dl
        path = os.path.join(self.tmp, "in_%s_%s_%s.safetensors" % (dt, gl, dl))
        st.write(path, [(n, dt, arrs[n]) for n in
                        ["hidden_states", "gate.weight", "experts.gate_up_proj",
                         "experts.down_proj", "grad_output"]], meta, pad=self.pad)
        return path, arrs

    def compare(self, res, dt, gl, dl, file_arrs):
        """Returns a list of problems (empty when everything matches)."""
        tensors, _ = res
        f, g = self.ref[dt]
        probs, errs = [], []
        want = {"output": (dt, (self.T, self.H)),
                "router_logits": ("F32", (self.T, self.E))}
        src = {"grad.hidden_states": "hidden_states", "grad.gate.weight": "gate.weight",
               "grad.experts.gate_up_proj": "experts.gate_up_proj",
               "grad.experts.down_proj": "experts.down_proj"}
        for n in GRADS:
            want[n] = (dt, file_arrs[src[n]].shape)
        for n, (wdt, wshape) in want.items():
            if n not in tensors:
                probs.append("%s missing" % n)
                continue
            gdt, arr = tensors[n]
            if gdt != wdt or tuple(arr.shape) != tuple(wshape):
                probs.append("%s is %s%s, expected %s%s" % (
                    n, gdt, list(arr.shape), wdt, list(wshape)))
                continue
            refv = f[n] if n in f else g[n]
            e = rel_err(to_logical(n, arr, gl, dl), refv)
            # router_logits are f32 even for bf16 inputs (exact bf16 values,
            # f32 accumulation): f32 accuracy.
            tol = 1e-5 if n == "router_logits" else TOL[dt]
            errs.append("%s %.1e" % (n.replace("grad.experts.", "d").replace("grad.", "d"), e))
            if not (e < tol):
                probs.append("%s rel err %.3e >= %g" % (n, e, tol))
        # Routing: the experts the CLI's own logits select must be the
        # reference's. A difference here means a tie flipped (inputs were
        # drawn with margin >= MIN_MARGIN, so it should never happen).
        if "router_logits" in tensors:
            lg = tensors["router_logits"][1].astype(np.float64)
            sel = np.sort(np.argsort(-lg, axis=1, kind="stable")[:, :self.k], axis=1)
            refsel = np.sort(f["topk"], axis=1)
            bad = np.nonzero((sel != refsel).any(axis=1))[0]
            if bad.size:
                t = int(bad[0])
                probs.append("ROUTING DIFFERS (tie flip?) at %d token(s), first t=%d: "
                             "cli experts %s, reference %s, reference margin %.2e" % (
                                 bad.size, t, sel[t].tolist(), refsel[t].tolist(),
                                 topk_margin(f["router_logits"], self.k)))
        return probs, ", ".join(errs)


def run_case(moe, case):
    for dt in ("F32", "BF16"):
        logical_results = {}
        for (gl, dl) in LAYOUTS:
            path, arrs = case.write(dt, gl, dl)
            for m in METHODS:
                # grouped and loop with --strict (no hidden copy allowed on
                # any layout); auto as a user would run it.
                strict = m != "auto"
                out = os.path.join(case.tmp, "out_%s_%s_%s_%s.safetensors" % (dt, gl, dl, m))
                res, err = run_cli(moe, path, out, m, strict=strict)
                name = "ref %s method=%s%s" % (case.tag(dt, gl, dl), m,
                                               " --strict" if strict else "")
                if m == "loop" and refused_up_front(err):
                    print("SKIP %s: %s" % (name, refused_up_front(err)), flush=True)
                    continue
                if err:
                    check(name, False, err)
                    continue
                probs, errs = case.compare(res, dt, gl, dl, arrs)
                if m != "auto" and res[1].get("method") not in (None, "%s/%s" % (m, m)):
                    probs.append("metadata method = %r, expected %s/%s" % (
                        res[1].get("method"), m, m))
                if case.mode == "one_expert":
                    # Every expert but 2 is empty: its gradients exactly zero.
                    for n in ("grad.experts.gate_up_proj", "grad.experts.down_proj"):
                        if n in res[0]:
                            a = res[0][n][1].copy()
                            a[2] = 0
                            if np.any(a != 0):
                                probs.append("%s non-zero for an empty expert" % n)
                check(name, not probs, "; ".join(probs) if probs else errs)
                if m == "grouped":
                    logical_results[(gl, dl)] = {
                        n: (v[0], to_logical(n, v[1], gl, dl))
                        for n, v in res[0].items()}
        # Bitwise equality across layouts, grouped pinned.
        base = logical_results.get(("out_in", "out_in"))
        for (gl, dl), r in logical_results.items():
            if (gl, dl) == ("out_in", "out_in") or base is None:
                continue
            diff = [n for n in base if n not in r or not np.array_equal(
                bits(base[n][1]), bits(r[n][1]))]
            check("bitwise layouts %s method=grouped: out_in/out_in vs %s/%s" % (
                case.tag(dt, gl, dl).split(" gate_up")[0], gl, dl), not diff,
                "differ: " + ", ".join(diff) if diff else "identical")


def determinism(moe, case):
    """--threads 1 vs 2 and run to run, each method pinned, bitwise."""
    for dt in ("F32", "BF16"):
        gl, dl = "in_out", "out_in"
        path, _ = case.write(dt, gl, dl)
        for m in ("grouped", "loop"):
            outs = {}
            for label, th in (("t1", 1), ("t2", 2), ("t2b", 2)):
                o = os.path.join(case.tmp, "det_%s_%s_%s.safetensors" % (dt, m, label))
                outs[label] = run_cli(moe, path, o, m, threads=th)
            tag = "%s method=%s" % (case.tag(dt, gl, dl), m)
            for a, b, what in (("t1", "t2", "--threads 1 vs 2"),
                               ("t2", "t2b", "two runs --threads 2")):
                ra, ea = outs[a]
                rb, eb = outs[b]
                if m == "loop" and (refused_up_front(ea) or refused_up_front(eb)):
                    print("SKIP bitwise %s %s: %s" % (
                        what, tag, refused_up_front(ea) or refused_up_front(eb)), flush=True)
                    continue
                if ea or eb:
                    check("bitwise %s %s" % (what, tag), False, ea or eb)
                    continue
                ok = same_bits(ra[0], rb[0])
                diff = [] if ok else [n for n in ra[0] if n not in rb[0] or not
                                      np.array_equal(bits(ra[0][n][1]), bits(rb[0][n][1]))]
                check("bitwise %s %s" % (what, tag), ok,
                      "differ: " + ", ".join(diff) if diff else "identical")


def explicit_metadata(moe, case):
    """Layout metadata that agrees with an unambiguous shape is accepted."""
    dt = "F32"
    for (gl, dl) in LAYOUTS:
        path, arrs = case.write(dt, gl, dl, always_meta=True)
        out = os.path.join(case.tmp, "meta_%s_%s.safetensors" % (gl, dl))
        res, err = run_cli(moe, path, out, "auto", strict=True)
        name = "explicit layout metadata %s --strict" % case.tag(dt, gl, dl)
        if err:
            check(name, False, err)
            continue
        probs, errs = case.compare(res, dt, gl, dl, arrs)
        check(name, not probs, "; ".join(probs) if probs else errs)


def main():
    if len(sys.argv) != 2:
        print("usage: test_reference.py PATH/TO/moe", file=sys.stderr)
        return 2
    moe = os.path.abspath(sys.argv[1])
    finite_difference_checks()
    rng = np.random.default_rng(20240611)
    with tempfile.TemporaryDirectory(prefix="moe_ref_") as tmp:
        cases = [
            Case(tmp, rng, 9, 6, 20, 7, 2, True),
            Case(tmp, rng, 9, 6, 20, 7, 2, False),
            Case(tmp, rng, 1, 5, 12, 5, 5, True),     # top_k = E, T = 1
            Case(tmp, rng, 1, 5, 12, 5, 5, False),
            Case(tmp, rng, 17, 4, 14, 7, 1, False),   # H = 2I: gate_up_layout
            Case(tmp, rng, 17, 4, 14, 7, 1, True),
            Case(tmp, rng, 6, 3, 10, 10, 2, True),    # H = I: down_layout
            Case(tmp, rng, 6, 3, 10, 10, 2, False),
            Case(tmp, rng, 23, 8, 18, 11, 3, False),
            Case(tmp, rng, 23, 8, 18, 11, 3, True),
            Case(tmp, rng, 11, 5, 13, 6, 1, False, mode="one_expert"),
            Case(tmp, rng, 10, 7, 15, 9, 2, False, pad=1),  # misaligned views
        ]
        for c in cases:
            run_case(moe, c)
        determinism(moe, cases[-3])
        determinism(moe, cases[1])
        explicit_metadata(moe, cases[0])
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
