#!/usr/bin/env python3
"""`moe layer` on malformed inputs and bad usage.

usage: test_errors.py PATH/TO/moe

Every case must: end without a signal and without a sanitizer report; exit
1 for a bad input file, 2 for bad usage (0 where the input is valid, e.g.
NaN values); name the file, tensor or argument on stderr; and leave no
output file and no temporary file behind (a pre-existing output file keeps
its bytes). Prints one line per check and ends with "N passed, M failed".
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402
from checks import Checks  # noqa: E402

MOE = None
TMP = None
_counter = [0]

T, E, H, I, K = 3, 4, 8, 3, 2
NAMES = ["hidden_states", "gate.weight", "experts.gate_up_proj",
         "experts.down_proj", "grad_output"]


check = Checks()


def arrays(t=T, e=E, h=H, i=I, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((t, h)),
        "gate.weight": rng.standard_normal((e, h)),
        "experts.gate_up_proj": rng.standard_normal((e, 2 * i, h)) * 0.3,
        "experts.down_proj": rng.standard_normal((e, h, i)) * 0.3,
        "grad_output": rng.standard_normal((t, h)),
    }


def tensors(arrs=None, dtypes=None, drop=(), dt="F32"):
    arrs = arrs or arrays()
    dtypes = dtypes or {}
    return [(n, dtypes.get(n, dt), arrs[n]) for n in NAMES
            if n in arrs and n not in drop]


def meta(**kw):
    m = {"top_k": str(K), "norm_topk_prob": "true"}
    for k, v in kw.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    return m


def new_dirs():
    _counter[0] += 1
    d = os.path.join(TMP, "case%03d" % _counter[0])
    os.makedirs(os.path.join(d, "in"))
    os.makedirs(os.path.join(d, "out"))
    return os.path.join(d, "in"), os.path.join(d, "out")


def write_input(data):
    ind, outd = new_dirs()
    p = os.path.join(ind, "input.safetensors")
    with open(p, "wb") as f:
        f.write(data)
    return p, outd


def run(args):
    try:
        p = subprocess.run([MOE] + args, capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        return None, "", "timed out"
    return p.returncode, p.stdout, p.stderr


def crash_problems(rc, err):
    probs = []
    if rc is None:
        probs.append("timed out")
    elif rc < 0 or rc >= 128:
        probs.append("killed by a signal (returncode %d)" % rc)
    for s in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
        if s in err:
            probs.append("sanitizer report '%s'" % s)
    return probs


def expect(name, args, want_rc, must_name=(), outd=None, out=None,
           precious=False):
    """Runs moe with args; checks rc, stderr naming, and output hygiene.

    must_name: substrings stderr must contain (file, tensor or argument).
    outd/out: the --out directory and path; after a failure nothing but a
    pre-existing file may be there. precious: out exists beforehand with
    known bytes that must survive.
    """
    keep = b"precious bytes, not a safetensors file\n"
    if precious:
        with open(out, "wb") as f:
            f.write(keep)
    rc, _, err = run(args)
    probs = crash_problems(rc, err)
    if rc is not None and rc != want_rc:
        probs.append("exit %d, expected %d" % (rc, want_rc))
    for s in must_name:
        if s not in err:
            probs.append("stderr does not name '%s'" % s)
    if want_rc != 0 and not err.strip():
        probs.append("stderr is empty")
    if outd is not None:
        left = sorted(os.listdir(outd))
        if precious:
            with open(out, "rb") as f:
                if f.read() != keep:
                    probs.append("existing output file was modified")
            left = [x for x in left if x != os.path.basename(out)]
        elif want_rc != 0 and out and os.path.exists(out):
            probs.append("output file left behind")
        if want_rc != 0 and left:
            probs.append("left in output dir: %s" % left)
    first = err.strip().splitlines()[0] if err.strip() else ""
    return check(name, not probs,
                 "; ".join(probs) + ("  [stderr: %s]" % first if first else "")
                 if probs else "exit %s: %s" % (rc, first))


def bad_file(name, data, must_name=(), backward=False, want_rc=1):
    """A malformed input file: exit 1, nothing written; then again with an
    existing output file that must stay untouched."""
    inp, outd = write_input(data)
    out = os.path.join(outd, "out.safetensors")
    args = ["layer", "--in", inp, "--out", out] + (["--backward"] if backward else [])
    expect(name, args, want_rc, (inp,) + tuple(must_name), outd, out)
    if want_rc != 0:
        expect(name + " (existing --out untouched)", args, want_rc,
               (inp,) + tuple(must_name), outd, out, precious=True)


def header_of(tlist, md):
    data = st.encode(tlist, md)
    (n,) = struct.unpack("<Q", data[:8])
    return data, n


def with_header(tlist, md, fn):
    """Encodes, letting fn rewrite the header dict (offsets already set)."""
    return st.encode(tlist, md, header_override=fn)


def file_cases():
    good, n = header_of(tensors(), meta())
    # Sanity: the unmodified file works, so failures below are the defects.
    inp, outd = write_input(good)
    out = os.path.join(outd, "out.safetensors")
    rc, _, err = run(["layer", "--in", inp, "--out", out, "--backward"])
    check("valid input is accepted (control)", rc == 0 and os.path.exists(out)
          and not crash_problems(rc, err), "exit %s %s" % (rc, err.strip()[:200]))

    # --- the container
    ind, outd = new_dirs()
    missing = os.path.join(ind, "does_not_exist.safetensors")
    out = os.path.join(outd, "out.safetensors")
    expect("nonexistent input", ["layer", "--in", missing, "--out", out], 1,
           (missing,), outd, out)
    expect("nonexistent input (existing --out untouched)",
           ["layer", "--in", missing, "--out", out], 1, (missing,), outd, out,
           precious=True)
    ind, outd = new_dirs()
    out = os.path.join(outd, "out.safetensors")
    expect("input is a directory", ["layer", "--in", ind, "--out", out], 1,
           (ind,), outd, out)
    bad_file("empty file", b"")
    bad_file("4-byte file", b"\x10\0\0\0")
    bad_file("truncated header (length past end)", good[:8 + n // 2])
    bad_file("truncated data section", good[:len(good) - 37])
    bad_file("header length 2^63", struct.pack("<Q", 1 << 63) + good[8:])
    bad_file("header length 2^64-1", b"\xff" * 8 + good[8:])
    bad_file("header length 0", struct.pack("<Q", 0) + good[8:])
    bad_file("header length 1 GiB", struct.pack("<Q", 1 << 30) + good[8:])
    garbage = b"{\"hidden_states\": {\"dtype\": \"F32\", \"sha"
    bad_file("garbage JSON", struct.pack("<Q", len(garbage)) + garbage + b"\0" * 64)
    bad_utf8 = b'{"\xff\xfe": "1"}'
    bad_file("header not UTF-8", struct.pack("<Q", len(bad_utf8)) + bad_utf8)
    bad_file("header is a JSON array", struct.pack("<Q", 8) + b"[1,2,3] ")
    bad_file("header with NUL byte", struct.pack("<Q", 8) + b"{}\0     ")

    # --- tensor entries
    def edit(name, **fields):
        def fn(h):
            h[name].update(fields)
            return h
        return fn

    total = len(good) - 8 - n
    bad_file("data_offsets end past the data section",
             with_header(tensors(), meta(), edit("experts.down_proj",
                                                 data_offsets=[0, total + 4096])),
             ("experts.down_proj",))
    bad_file("data_offsets begin > end",
             with_header(tensors(), meta(), edit("gate.weight", data_offsets=[64, 32])),
             ("gate.weight",))
    bad_file("data_offsets negative",
             with_header(tensors(), meta(), edit("gate.weight", data_offsets=[-8, 120])),
             ("gate.weight",))
    bad_file("data_offsets 2^64",
             with_header(tensors(), meta(), edit("hidden_states",
                                                 data_offsets=[0, 18446744073709551616])),
             ("hidden_states",))
    bad_file("bytes shorter than shape x dtype",
             with_header(tensors(), meta(), edit("experts.gate_up_proj",
                                                 shape=[E, 2 * I, H + 1])),
             ("experts.gate_up_proj",))
    bad_file("shape product overflows int64",
             with_header(tensors(), meta(), edit("hidden_states",
                                                 shape=[1 << 40, 1 << 40, 1 << 20])),
             ("hidden_states",))
    bad_file("negative shape",
             with_header(tensors(), meta(), edit("hidden_states", shape=[-3, -8])),
             ("hidden_states",))
    bad_file("non-integer shape",
             with_header(tensors(), meta(), edit("hidden_states", shape=[3.5, 8])),
             ("hidden_states",))
    bad_file("dtype missing",
             with_header(tensors(), meta(),
                         lambda h: (h["gate.weight"].pop("dtype"), h)[1]),
             ("gate.weight",))
    bad_file("unknown dtype string",
             with_header(tensors(), meta(), edit("gate.weight", dtype="Q4_K")),
             ("gate.weight",))

    def overlap(h):
        h["gate.weight"]["data_offsets"] = list(h["hidden_states"]["data_offsets"])
        h["gate.weight"]["shape"] = [T, H]
        return h
    bad_file("overlapping tensors", with_header(tensors(), meta(), overlap))
    bad_file("metadata value not a string",
             with_header(tensors(), dict(meta(), top_k=2), lambda h: h), ("top_k",))
    bad_file("__metadata__ not an object",
             with_header(tensors(), None, lambda h: dict(h, __metadata__=[1])))

    # --- the layer's contract
    a = arrays()
    i32 = dict(a)
    i32["hidden_states"] = np.round(a["hidden_states"] * 10).astype(np.int32)
    bad_file("I32 hidden_states",
             st.encode(tensors(i32, {"hidden_states": "I32"}), meta()),
             ("hidden_states",))
    bad_file("F64 everywhere", st.encode(tensors(dt="F64"), meta()),
             ("hidden_states",))
    bad_file("mixed dtypes (gate.weight BF16)",
             st.encode(tensors(dtypes={"gate.weight": "BF16"}), meta()),
             ("gate.weight",))
    bad_file("mixed dtypes (experts.down_proj F16)",
             st.encode(tensors(dtypes={"experts.down_proj": "F16"}), meta()),
             ("experts.down_proj",))
    bad_file("mixed dtypes (grad_output BF16, --backward)",
             st.encode(tensors(dtypes={"grad_output": "BF16"}), meta()),
             ("grad_output",), backward=True)
    # F16 is "welcome" but not required: a clear refusal or a result.
    inp, outd = write_input(st.encode(tensors(dt="F16"), meta()))
    out = os.path.join(outd, "out.safetensors")
    rc, _, err = run(["layer", "--in", inp, "--out", out, "--backward"])
    probs = crash_problems(rc, err)
    if rc == 0:
        if not os.path.exists(out):
            probs.append("exit 0 but no output")
    elif rc == 1:
        if "hidden_states" not in err:
            probs.append("stderr does not name hidden_states")
        if os.listdir(outd):
            probs.append("left in output dir: %s" % os.listdir(outd))
    else:
        probs.append("exit %s, expected 0 (supported) or 1 (refused)" % rc)
    check("F16 everywhere: supported or refused cleanly", not probs,
          "; ".join(probs) if probs else "exit %d %s" % (rc, err.strip()[:120]))

    def shaped(**kw):
        x = arrays()
        x.update(kw)
        return x
    rng = np.random.default_rng(1)
    bad_file("gate.weight H != hidden H",
             st.encode(tensors(shaped(**{"gate.weight": rng.standard_normal((E, H + 1))})),
                       meta()), ("gate.weight",))
    bad_file("experts.down_proj wrong shape",
             st.encode(tensors(shaped(**{"experts.down_proj":
                                         rng.standard_normal((E, H, I + 1))})), meta()),
             ("experts.down_proj",))
    bad_file("experts.down_proj wrong E",
             st.encode(tensors(shaped(**{"experts.down_proj":
                                         rng.standard_normal((E + 1, H, I))})), meta()),
             ("experts.down_proj",))
    bad_file("experts.gate_up_proj odd 2I",
             st.encode(tensors(shaped(**{"experts.gate_up_proj":
                                         rng.standard_normal((E, 2 * I + 1, H))})), meta()),
             ("experts.gate_up_proj",))
    bad_file("experts.gate_up_proj wrong E",
             st.encode(tensors(shaped(**{"experts.gate_up_proj":
                                         rng.standard_normal((E - 1, 2 * I, H))})), meta()),
             ("experts.gate_up_proj",))
    bad_file("experts.gate_up_proj 2-D",
             st.encode(tensors(shaped(**{"experts.gate_up_proj":
                                         rng.standard_normal((E * 2 * I, H))})), meta()),
             ("experts.gate_up_proj",))
    bad_file("hidden_states 3-D",
             st.encode(tensors(shaped(hidden_states=rng.standard_normal((1, T, H)))),
                       meta()), ("hidden_states",))
    bad_file("grad_output wrong shape (--backward)",
             st.encode(tensors(shaped(grad_output=rng.standard_normal((T + 1, H)))),
                       meta()), ("grad_output",), backward=True)
    for nm in NAMES[:4]:
        bad_file("missing tensor %s" % nm, st.encode(tensors(drop=(nm,)), meta()), (nm,))
    bad_file("--backward without grad_output",
             st.encode(tensors(drop=("grad_output",)), meta()), ("grad_output",),
             backward=True)
    bad_file("missing top_k metadata", st.encode(tensors(), meta(top_k=None)), ("top_k",))
    bad_file("no __metadata__ at all", st.encode(tensors(), None), ("top_k",))
    for v, why in (("5", "top_k > E"), ("0", "top_k = 0"), ("-1", "top_k = -1"),
                   ("two", "top_k not a number"), ("2x", "top_k trailing junk"),
                   ("", "top_k empty"), ("99999999999999999999999", "top_k overflows"),
                   ("2.0", "top_k not an integer")):
        bad_file(why, st.encode(tensors(), meta(top_k=v)), ("top_k",))
    bad_file("norm_topk_prob bogus", st.encode(tensors(), meta(norm_topk_prob="yes")),
             ("norm_topk_prob",))
    bad_file("gate_up_layout bogus", st.encode(tensors(), meta(gate_up_layout="row_major")),
             ("gate_up_layout",))

    # Ambiguous shapes need metadata; contradictory metadata is refused.
    amb = arrays(h=2 * I)          # H = 2I: gate_up [E,6,6] either way
    bad_file("ambiguous H = 2I without gate_up_layout",
             st.encode(tensors(amb), meta()), ("gate_up_layout",))
    amb_d = arrays(h=I)            # H = I: down [E,3,3] either way
    bad_file("ambiguous H = I without down_layout",
             st.encode(tensors(amb_d), meta()), ("down_layout",))
    bad_file("gate_up_layout contradicts the shape",
             st.encode(tensors(), meta(gate_up_layout="in_out")), ("gate_up_layout",))
    bad_file("down_layout contradicts the shape",
             st.encode(tensors(), meta(down_layout="in_out")), ("down_layout",))

    # Degenerate sizes: no crash; a result or a clean refusal.
    for label, arrs in (("T = 0 tokens", arrays(t=0)), ("I = 0", arrays(i=0)),
                        ("E = 0 experts", arrays(e=0))):
        inp, outd = write_input(st.encode(tensors(arrs), meta(top_k="1")))
        out = os.path.join(outd, "out.safetensors")
        rc, _, err = run(["layer", "--in", inp, "--out", out, "--backward"])
        probs = crash_problems(rc, err)
        if rc == 0 and not os.path.exists(out):
            probs.append("exit 0 but no output")
        if rc == 1 and os.listdir(outd):
            probs.append("left in output dir: %s" % os.listdir(outd))
        if rc not in (0, 1, None):
            probs.append("exit %s" % rc)
        check("%s: result or clean error" % label, not probs,
              "; ".join(probs) if probs else "exit %s %s" % (rc, err.strip()[:120]))


def nan_cases():
    for label, val in (("NaN", np.nan), ("Inf", np.inf)):
        for dt in ("F32", "BF16"):
            a = arrays()
            a["hidden_states"][1, 3] = val
            inp, outd = write_input(st.encode(tensors(a, dt=dt), meta()))
            out = os.path.join(outd, "out.safetensors")
            rc, _, err = run(["layer", "--in", inp, "--out", out, "--backward"])
            probs = crash_problems(rc, err)
            if rc != 0:
                probs.append("exit %s, expected 0: %s" % (rc, err.strip()[:200]))
            elif not os.path.exists(out):
                probs.append("no output file")
            else:
                try:
                    res, _ = st.read(out)
                    o = res["output"][1]
                    if not np.all(np.isfinite(np.delete(o, 1, axis=0))):
                        probs.append("%s leaked into other tokens' output" % label)
                except Exception as e:  # noqa: BLE001
                    probs.append("output unreadable: %s" % e)
                extra = [x for x in os.listdir(outd) if x != "out.safetensors"]
                if extra:
                    probs.append("extra files: %s" % extra)
            check("%s in hidden_states %s --backward: exit 0, file written" % (label, dt),
                  not probs, "; ".join(probs))


def output_path_cases():
    inp, outd = write_input(st.encode(tensors(), meta()))
    nodir = os.path.join(outd, "no", "such", "dir", "out.safetensors")
    expect("--out in a nonexistent directory",
           ["layer", "--in", inp, "--out", nodir], 1, (nodir,), outd, nodir)
    expect("--out is an existing directory",
           ["layer", "--in", inp, "--out", outd], 1, (outd,))
    if os.path.isdir(outd) and not os.listdir(outd):
        check("--out directory left as it was", True)
    else:
        check("--out directory left as it was", False,
              "now %s" % (os.listdir(outd) if os.path.isdir(outd) else "not a dir"))
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = os.path.join(outd, "readonly")
        os.makedirs(ro)
        os.chmod(ro, 0o555)
        out = os.path.join(ro, "out.safetensors")
        expect("--out in a read-only directory",
               ["layer", "--in", inp, "--out", out], 1, (out,), ro, out)
        os.chmod(ro, 0o755)
    else:
        print("SKIP --out in a read-only directory: running as root", flush=True)


def special_target_cases():
    """--out naming a FIFO, a character device or a link to /dev/null is
    refused and the node left as it was (issue 12, defect 3)."""
    import stat as st_mod
    inp, outd = write_input(st.encode(tensors(), meta()))
    fifo = os.path.join(outd, "fifo")
    os.mkfifo(fifo)
    expect("--out is a FIFO", ["layer", "--in", inp, "--out", fifo], 1,
           (fifo, "FIFO"))
    check("--out FIFO is still a FIFO and nothing else is left",
          st_mod.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(outd) == ["fifo"],
          "now %s" % os.listdir(outd))
    os.unlink(fifo)
    link = os.path.join(outd, "null")
    os.symlink("/dev/null", link)
    expect("--out is a link to /dev/null", ["layer", "--in", inp, "--out", link],
           1, (link, "character device"))
    check("--out link to /dev/null untouched",
          os.path.islink(link) and os.readlink(link) == "/dev/null"
          and os.listdir(outd) == ["null"], "now %s" % os.listdir(outd))
    os.unlink(link)
    dev = os.path.join(outd, "chardev")
    try:
        os.mknod(dev, 0o600 | st_mod.S_IFCHR, os.makedev(1, 3))
    except OSError as e:
        print("SKIP --out is a character device: mknod: %s" % e, flush=True)
        return
    expect("--out is a character device", ["layer", "--in", inp, "--out", dev],
           1, (dev, "character device"))
    check("--out character device is still one",
          st_mod.S_ISCHR(os.lstat(dev).st_mode), "mode %o" % os.lstat(dev).st_mode)
    os.unlink(dev)


def long_name_cases():
    """Basenames of 245..255 characters work (issue 12, defect 8)."""
    inp, outd = write_input(st.encode(tensors(), meta()))
    for n in (245, 250, 255):
        out = os.path.join(outd, "o" * (n - 12) + ".safetensors")
        rc, _, err = run(["layer", "--in", inp, "--out", out])
        probs = crash_problems(rc, err)
        if rc != 0:
            probs.append("exit %s: %s" % (rc, err.strip()[:200]))
        left = [x for x in os.listdir(outd) if x != os.path.basename(out)]
        if not os.path.exists(out):
            probs.append("no output file")
        if left:
            probs.append("left in output dir: %s" % left)
        check("--out with a %d-character basename" % n, not probs,
              "; ".join(probs))
        if os.path.exists(out):
            os.unlink(out)


def interrupt_cases():
    """SIGINT / SIGTERM while `moe layer` writes a large result leaves no
    temporary file (issue 12, defect 7)."""
    import signal
    import time
    t, e, h, i = 24000, 4, 320, 8  # ~31 MB output + 0.4 MB logits
    rng = np.random.default_rng(5)
    arrs = {
        "hidden_states": rng.standard_normal((t, h)),
        "gate.weight": rng.standard_normal((e, h)),
        "experts.gate_up_proj": rng.standard_normal((e, 2 * i, h)) * 0.1,
        "experts.down_proj": rng.standard_normal((e, h, i)) * 0.1,
    }
    data = st.encode([(n, "F32", arrs[n]) for n in NAMES if n in arrs], meta())
    inp, outd = write_input(data)
    out = os.path.join(outd, "out.safetensors")
    for sig in (signal.SIGINT, signal.SIGTERM):
        caught = False
        for attempt in range(5):
            for x in os.listdir(outd):
                os.unlink(os.path.join(outd, x))
            p = subprocess.Popen([MOE, "layer", "--in", inp, "--out", out,
                                  "--threads", "2"],
                                 stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
            deadline = time.time() + 60
            while p.poll() is None and time.time() < deadline:
                if [x for x in os.listdir(outd) if x != "out.safetensors"]:
                    p.send_signal(sig)
                    caught = True
                    break
            if p.poll() is None and not caught:
                p.kill()
            p.wait(timeout=60)
            err = p.stderr.read().decode(errors="replace")
            p.stderr.close()
            if caught:
                break
        left = [x for x in os.listdir(outd) if x != "out.safetensors"]
        probs = []
        if not caught:
            probs.append("never saw the write in progress in 5 runs")
        elif p.returncode != -sig:
            probs.append("exit %s, expected death by signal %d" %
                         (p.returncode, sig))
        if left:
            probs.append("left behind: %s" % left)
        for s_ in ("AddressSanitizer", "runtime error:"):
            if s_ in err:
                probs.append("sanitizer report")
        check("%s during the results write leaves no temporary"
              % signal.Signals(sig).name, not probs, "; ".join(probs))


def usage_cases():
    ind, outd = new_dirs()
    inp = os.path.join(ind, "in.safetensors")
    st.write(inp, tensors(), meta())
    out = os.path.join(outd, "out.safetensors")
    cases = [
        ("no arguments", [], ()),
        ("unknown command", ["frobnicate"], ("frobnicate",)),
        ("layer with no arguments", ["layer"], ("--in",)),
        ("unknown option", ["layer", "--in", inp, "--out", out, "--bogus"], ("--bogus",)),
        ("--method bogus", ["layer", "--in", inp, "--out", out, "--method", "bogus"],
         ("--method",)),
        ("--threads -1", ["layer", "--in", inp, "--out", out, "--threads", "-1"],
         ("--threads",)),
        ("--threads abc", ["layer", "--in", inp, "--out", out, "--threads", "abc"],
         ("--threads",)),
        ("--threads 1e9", ["layer", "--in", inp, "--out", out, "--threads",
                           "99999999999999999999"], ("--threads",)),
        ("missing --out", ["layer", "--in", inp], ("--out",)),
        ("missing --in", ["layer", "--out", out], ("--in",)),
        ("--in without a value", ["layer", "--out", out, "--in"], ("--in",)),
        ("--method without a value", ["layer", "--in", inp, "--out", out, "--method"],
         ("--method",)),
    ]
    for label, args, names in cases:
        expect("usage: " + label, args, 2, names, outd, out)
    with open(out, "wb"):
        pass
    expect("usage: unknown option (existing --out untouched)",
           ["layer", "--in", inp, "--out", out, "--bogus"], 2, ("--bogus",), outd, out,
           precious=True)
    for args in (["--help"], ["layer", "--help"], ["bench", "--help"], ["plan", "--help"]):
        rc, so, err = run(args)
        probs = crash_problems(rc, err)
        if rc != 0:
            probs.append("exit %s" % rc)
        if "usage" not in so.lower():
            probs.append("no usage text on stdout")
        check("moe %s exits 0" % " ".join(args), not probs, "; ".join(probs))


def main():
    global MOE, TMP
    if len(sys.argv) != 2:
        print("usage: test_errors.py PATH/TO/moe", file=sys.stderr)
        return 2
    MOE = os.path.abspath(sys.argv[1])
    TMP = tempfile.mkdtemp(prefix="moe_err_")
    try:
        file_cases()
        nan_cases()
        output_path_cases()
        special_target_cases()
        long_name_cases()
        interrupt_cases()
        usage_cases()
    finally:
        for root, dirs, _ in os.walk(TMP):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(TMP, ignore_errors=True)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
