#!/usr/bin/env python3
"""The `moe` CLI under mpirun.

- `moe layer --backward` under mpirun -np 1..4 writes, on rank 0, the same
  file as one plain process: every tensor bitwise, except the router-weight
  gradient (a sum of per-rank partials), which must match within rounding.
- `moe layer` with experts not divisible by the ranks fails on every rank
  with a message saying so.
- `moe train` on 2 ranks prints the same loss curve and final parameter
  checksum as on one, bit for bit, and the loss falls.
- Ranks given different inputs or options (an MPMD launch: `mpirun -np 1
  moe layer ARGS0 : -np 1 moe layer ARGS1`) all fail, before any
  collective that depends on them, with a message naming both ranks'
  values -- no heap overflow, no mixed output, no hang (issue 12).

usage: test_ep_cli.py --moe PATH --mpiexec PATH [--np-flag -n]
                      [--mpiexec-flags "--oversubscribe"]
Prints "N passed, M failed"; exits non-zero on a failure.
"""
import argparse
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import tempfile

import numpy as np

PASSED = 0
FAILED = 0


def check(ok, what):
    global PASSED, FAILED
    if ok:
        PASSED += 1
    else:
        FAILED += 1
        print("FAIL: " + what, file=sys.stderr)


def to_bf16(a):
    """f32 array -> uint16 bf16 bits (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_st(path, tensors, meta):
    """tensors: name -> (dtype string, shape, raw bytes)."""
    header, blobs, at = {}, [], 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = (t["dtype"], tuple(t["shape"]), data[base + a:base + b])
    return out, meta


def values(t):
    dt, shape, raw = t
    if dt == "F32":
        return np.frombuffer(raw, dtype=np.float32).reshape(shape)
    return from_bf16(np.frombuffer(raw, dtype=np.uint16)).reshape(shape)


def make_input(path, rng, T, H, E, I, k, dtype, layout):
    def t(shape, scale):
        a = (rng.uniform(-1, 1, size=shape) * scale).astype(np.float32)
        if dtype == "BF16":
            return (dtype, shape, to_bf16(a).tobytes())
        return (dtype, shape, a.tobytes())
    gu = (E, 2 * I, H) if layout == "out_in" else (E, H, 2 * I)
    dn = (E, H, I) if layout == "out_in" else (E, I, H)
    tensors = {
        "hidden_states": t((T, H), 1.0),
        "gate.weight": t((E, H), 0.5),
        "experts.gate_up_proj": t(gu, 0.3),
        "experts.down_proj": t(dn, 0.3),
        "grad_output": t((T, H), 1.0),
    }
    write_st(path, tensors, {"top_k": str(k), "norm_topk_prob": "true",
                             "gate_up_layout": layout, "down_layout": layout})


class Runner:
    def __init__(self, a):
        self.moe = a.moe
        self.mpiexec = a.mpiexec
        self.np_flag = a.np_flag
        self.flags = shlex.split(a.mpiexec_flags or "")
        self.env = dict(os.environ)
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def run(self, args, ranks=None, timeout=120):
        cmd = [self.moe] + args
        if ranks is not None:
            cmd = [self.mpiexec, self.np_flag, str(ranks)] + self.flags + cmd
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        return p, " ".join(shlex.quote(c) for c in cmd)


def run_mpmd(r, cmds, timeout=90):
    """Runs one rank per entry of cmds (argument lists for moe) as one MPI
    job. Returns (returncode or None on a hang, stderr, the command line);
    a hung job is killed with its whole process group."""
    cmd = [r.mpiexec] + r.flags
    for i, args in enumerate(cmds):
        if i:
            cmd.append(":")
        cmd += [r.np_flag, "1", r.moe] + args
    line = " ".join(shlex.quote(c) for c in cmd)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=r.env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, err, line
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, err, line


def test_rank_mismatch(r, tmp):
    rng = np.random.default_rng(11)
    files = {}
    for tag, (T, dt, lay, norm) in {
            "t6": (6, "F32", "out_in", "true"),
            "t60": (60, "F32", "out_in", "true"),
            "t7": (7, "F32", "out_in", "true"),
            "bf16": (6, "BF16", "out_in", "true"),
            "io": (6, "F32", "in_out", "true"),
            "nonorm": (6, "F32", "out_in", "false")}.items():
        path = os.path.join(tmp, "mm_%s.safetensors" % tag)
        make_input(path, rng, T, 16, 4, 16, 2, dt, lay)
        if norm == "false":  # rewrite with norm_topk_prob = false
            t, meta = read_st(path)
            meta["norm_topk_prob"] = "false"
            write_st(path, t, meta)
        files[tag] = path
    out = os.path.join(tmp, "mm_out.safetensors")

    def layer(tag, *extra):
        return ["layer", "--in", files[tag], "--out", out, "--threads", "1"] \
            + list(extra)

    cases = [
        ("T=6 vs T=60", [layer("t6"), layer("t60")],
         ["rank 0 has T=6", "rank 1 has T=60"]),
        ("T=6 vs T=7", [layer("t6"), layer("t7")],
         ["rank 0 has T=6", "rank 1 has T=7"]),
        ("--backward on rank 1 only", [layer("t6"), layer("t6", "--backward")],
         ["rank 0 has --backward=no", "rank 1 has --backward=yes"]),
        ("--method grouped vs loop",
         [layer("t6", "--method", "grouped"), layer("t6", "--method", "loop")],
         ["rank 0 has --method=grouped", "rank 1 has --method=loop"]),
        ("--strict on rank 1 only", [layer("t6"), layer("t6", "--strict")],
         ["rank 0 has --strict=no", "rank 1 has --strict=yes"]),
        ("f32 vs bf16 input", [layer("t6"), layer("bf16")],
         ["rank 0 has dtype=f32", "rank 1 has dtype=bf16"]),
        ("out_in vs in_out input", [layer("t6"), layer("io")],
         ["rank 0 has gate_up_layout=out_in", "rank 1 has gate_up_layout=in_out"]),
        ("norm_topk_prob true vs false", [layer("t6"), layer("nonorm")],
         ["rank 0 has norm_topk_prob=yes", "rank 1 has norm_topk_prob=no"]),
        ("--backward on rank 2 of 3 only",
         [layer("t6"), layer("t6"), layer("t6", "--backward")],
         ["rank 0 has --backward=no", "rank 2 has --backward=yes"]),
    ]
    for label, cmds, want in cases:
        if os.path.exists(out):
            os.unlink(out)
        rc, err, line = run_mpmd(r, cmds)
        probs = []
        if rc is None:
            probs.append("hung (killed after the timeout)")
        elif rc == 0:
            probs.append("exit 0")
        for w in want:
            if w not in err:
                probs.append("stderr lacks '%s'" % w)
        if ("AddressSanitizer" in err or "runtime error:" in err
                or "Segmentation" in err or "signal 11" in err):
            probs.append("crash or sanitizer report")
        if os.path.exists(out):
            probs.append("an output file was written")
        check(not probs, "ranks disagree (%s): %s\n%s\nstderr: %s"
              % (label, "; ".join(probs), line, err[-1500:]))
    # The same flags in another order, on every rank: accepted.
    rc, err, line = run_mpmd(r, [layer("t6", "--strict", "--backward"),
                                 layer("t6", "--backward", "--strict")])
    check(rc == 0 and os.path.exists(out),
          "ranks agreeing on flags given in another order: exit %s\n%s\n%s"
          % (rc, line, err[-1500:]))
    # moe train: one rank with other options.
    rc, err, line = run_mpmd(r, [["train", "--steps", "3", "--threads", "1"],
                                 ["train", "--steps", "4", "--threads", "1"]])
    check(rc not in (None, 0) and "rank 0 has --steps=3" in err
          and "rank 1 has --steps=4" in err,
          "moe train with --steps 3 vs 4: exit %s\n%s\n%s"
          % (rc, line, err[-1500:]))


def test_layer(r, tmp):
    rng = np.random.default_rng(7)
    shapes = [  # T, H, E, I, k, dtype, layout
        (13, 24, 12, 8, 3, "F32", "out_in"),
        (10, 20, 12, 6, 2, "BF16", "in_out"),
        (3, 16, 12, 5, 4, "F32", "in_out"),  # fewer tokens than 4 ranks
    ]
    for i, (T, H, E, I, k, dt, lay) in enumerate(shapes):
        src = os.path.join(tmp, "in%d.safetensors" % i)
        make_input(src, rng, T, H, E, I, k, dt, lay)
        ref = os.path.join(tmp, "ref%d.safetensors" % i)
        p, cmd = r.run(["layer", "--in", src, "--out", ref, "--backward",
                        "--method", "grouped", "--threads", "1"])
        check(p.returncode == 0, "%s: exit %d\n%s" % (cmd, p.returncode,
                                                      p.stderr))
        if p.returncode:
            continue
        want, want_meta = read_st(ref)
        for P in (1, 2, 3, 4):
            out = os.path.join(tmp, "ep%d_%d.safetensors" % (i, P))
            p, cmd = r.run(["layer", "--in", src, "--out", out, "--backward",
                            "--method", "grouped", "--threads", "1"], ranks=P)
            check(p.returncode == 0, "%s: exit %d\n%s" % (cmd, p.returncode,
                                                          p.stderr))
            if p.returncode:
                continue
            got, got_meta = read_st(out)
            check(got_meta == want_meta, "%s: metadata %s != %s"
                  % (cmd, got_meta, want_meta))
            check(sorted(got) == sorted(want), "%s: tensors %s != %s"
                  % (cmd, sorted(got), sorted(want)))
            for name in want:
                if name not in got:
                    continue
                if name == "grad.gate.weight":
                    a, b = values(got[name]), values(want[name])
                    tol = 1e-5 if dt == "F32" else 2.0 ** -6
                    scale = np.abs(b).max() + 1e-30
                    err = np.abs(a - b).max() / scale
                    check(err <= tol, "%s: %s off by %.3g (relative to its "
                          "largest element)" % (cmd, name, err))
                else:
                    check(got[name] == want[name], "%s: %s is not bitwise "
                          "identical to one process" % (cmd, name))
    # Experts not divisible by the ranks: every rank fails, saying why.
    src = os.path.join(tmp, "in0.safetensors")
    out = os.path.join(tmp, "bad.safetensors")
    p, cmd = r.run(["layer", "--in", src, "--out", out], ranks=5)
    check(p.returncode != 0 and "divisible" in p.stderr
          and not os.path.exists(out),
          "%s: expected a 'not divisible' failure, got exit %d\n%s"
          % (cmd, p.returncode, p.stderr))


def test_train(r):
    args = ["train", "--steps", "30", "--threads", "1"]
    p1, c1 = r.run(args)
    p2, c2 = r.run(args, ranks=2)
    check(p1.returncode == 0, "%s: exit %d\n%s" % (c1, p1.returncode,
                                                   p1.stderr))
    check(p2.returncode == 0, "%s: exit %d\n%s" % (c2, p2.returncode,
                                                   p2.stderr))
    if p1.returncode or p2.returncode:
        return
    keep = lambda out: [l for l in out.splitlines()
                        if l.startswith(("step", "params"))]
    a, b = keep(p1.stdout), keep(p2.stdout)
    check(len(a) == 31 and a == b,
          "moe train: 1 and 2 ranks differ:\n%s\n---\n%s"
          % ("\n".join(a), "\n".join(b)))
    losses = [float(l.split()[3]) for l in a if l.startswith("step")]
    check(len(losses) == 30 and losses[-1] < losses[0] - 0.5,
          "moe train: the loss does not fall: %s" % losses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--np-flag", default="-n")
    ap.add_argument("--mpiexec-flags", default="")
    a = ap.parse_args()
    r = Runner(a)
    with tempfile.TemporaryDirectory() as tmp:
        test_rank_mismatch(r, tmp)
        test_layer(r, tmp)
        test_train(r)
    print("test_ep_cli: %d passed, %d failed" % (PASSED, FAILED))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
