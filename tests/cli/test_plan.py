#!/usr/bin/env python3
"""`moe plan`: the saved bytes and each pass's workspace, in text and JSON,
and offline planning for a built-in card (`--device cuda --gpu h100|h200`).

usage: test_plan.py PATH/TO/moe

The saved bytes must stay within issue 16's bound, T*k*2I*es + 16*T*k +
64*E (the pre-activation H and the routing metadata), computed here from
the shape the plan reports; the text and JSON forms must agree; bad options
exit 2 naming the option. Prints one line per check and ends with
"N passed, M failed".
"""
import json
import re
import subprocess
import sys

from checks import Checks

check = Checks()


def run(moe, *args):
    r = subprocess.run([moe, "plan", *args], capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stdout, r.stderr


def check_sizes(name, j):
    es = {"f32": 4, "bf16": 2}[j["dtype"]]
    S = j["tokens"] * j["top_k"]
    h = S * 2 * j["intermediate"] * es
    bound = h + 16 * S + 64 * j["experts"]
    check(name + ": bound as issue 16 defines it",
          j["saved_bound_bytes"] == bound,
          "%d vs %d" % (j["saved_bound_bytes"], bound))
    check(name + ": saved within T*k*2I*es + 16*T*k + 64*E",
          h <= j["saved_bytes"] <= bound,
          "H %d <= saved %d <= bound %d" % (h, j["saved_bytes"], bound))
    for p in ("fwd", "bwd", "infer"):
        check(name + ": %s workspace reported" % p,
              isinstance(j.get(p + "_workspace_bytes"), int) and
              j[p + "_workspace_bytes"] > 0, str(j.get(p + "_workspace_bytes")))


def main():
    moe = sys.argv[1]
    # "cuda" when the build has the CUDA backend (tests/CMakeLists.txt):
    # then offline planning must work, GPU or not.
    has_cuda = len(sys.argv) > 2 and sys.argv[2] == "cuda"
    prev = None
    for preset, tokens, dt in (("tiny", "64", "bf16"),
                               ("qwen3-30b-a3b", "257", "bf16"),
                               ("qwen3-30b-a3b", "513", "bf16"),
                               ("mixtral-8x7b", "33", "f32")):
        name = "%s T=%s %s" % (preset, tokens, dt)
        rc, out, err = run(moe, "--preset", preset, "--tokens", tokens,
                           "--dtype", dt, "--json")
        if not check(name + ": --json exits 0", rc == 0, err.strip()):
            continue
        try:
            j = json.loads(out)
        except ValueError as e:
            check(name + ": one JSON object", False, "%s: %r" % (e, out))
            continue
        check(name + ": JSON names the plan",
              j["preset"] == preset and j["tokens"] == int(tokens) and
              j["dtype"] == dt and j["device"] == "cpu" and j["gpu"] is None
              and j["gate_up"] in ("grouped", "loop")
              and j["down"] in ("grouped", "loop"), out.strip())
        check_sizes(name, j)
        if preset == "qwen3-30b-a3b":
            if prev is not None:
                check("saved grows with the tokens",
                      j["saved_bytes"] > prev, "%d vs %d" % (
                          j["saved_bytes"], prev))
            prev = j["saved_bytes"]
        # The text form carries the same numbers.
        rc, out, err = run(moe, "--preset", preset, "--tokens", tokens,
                           "--dtype", dt)
        check(name + ": text exits 0", rc == 0, err.strip())
        nums = dict((k.strip(), int(v)) for k, v in re.findall(
            r"^\s*([a-z ()>-]+?)\s+[0-9.]+ \S+ \((\d+) bytes\)", out, re.M))
        for label, key in (("saved (fwd -> bwd)", "saved_bytes"),
                           ("forward workspace", "fwd_workspace_bytes"),
                           ("backward workspace", "bwd_workspace_bytes"),
                           ("inference workspace", "infer_workspace_bytes")):
            check(name + ": text '%s' = JSON %s" % (label, key),
                  nums.get(label) == j[key], "%s vs %s" % (nums.get(label),
                                                           j[key]))

    # Offline planning for a built-in card: a build with the CUDA backend
    # plans from the built-in table without a GPU (CI has nvcc, no GPU);
    # one without it answers MOE_ERR_UNIMPLEMENTED in one line, exit 1.
    for gpu, extra in (("h100", ["--device", "cuda"]), ("h200", [])):
        name = "--gpu %s%s" % (gpu, " --device cuda" if extra else "")
        rc, out, err = run(moe, "--preset", "qwen3-30b-a3b", "--tokens",
                           "4096", "--json", "--gpu", gpu, *extra)
        if has_cuda:
            check(name + ": offline plan succeeds in a CUDA build", rc == 0,
                  "rc %d, stderr %r" % (rc, err))
        if rc == 0:
            j = json.loads(out)
            check(name + ": offline plan for the card",
                  j["device"] == "cuda" and j["gpu"] == gpu, out.strip())
            check_sizes(name, j)
        else:
            lines = err.strip().splitlines()
            check(name + ": refused cleanly (exit 1, one line naming "
                  "MOE_ERR_UNIMPLEMENTED and the card)",
                  rc == 1 and len(lines) == 1 and
                  "MOE_ERR_UNIMPLEMENTED" in err and gpu in err and
                  "Traceback" not in err and out == "",
                  "rc %d, stderr %r" % (rc, err))

    # A shape without a preset (--experts/--hidden/--intermediate/--top-k),
    # and one dimension overriding a preset's.
    rc, out, err = run(moe, "--experts", "37", "--hidden", "200",
                       "--intermediate", "93", "--top-k", "3", "--tokens",
                       "301", "--json")
    if check("custom shape: --json exits 0", rc == 0, err.strip()):
        j = json.loads(out)
        check("custom shape: JSON names it",
              j["preset"] == "custom" and j["experts"] == 37 and
              j["hidden"] == 200 and j["intermediate"] == 93 and
              j["top_k"] == 3 and j["tokens"] == 301, out.strip())
        check_sizes("custom shape", j)
    rc, out, err = run(moe, "--preset", "qwen3-30b-a3b", "--intermediate",
                       "1536", "--tokens", "257", "--json")
    if check("preset with --intermediate: exits 0", rc == 0, err.strip()):
        j = json.loads(out)
        check("preset with --intermediate: the override, the rest kept",
              j["preset"] == "custom" and j["intermediate"] == 1536 and
              j["experts"] == 128 and j["hidden"] == 2048 and
              j["top_k"] == 8, out.strip())
        check_sizes("preset with --intermediate", j)
    # --overwrite-saved: the backward's workspace without dH [T*k, 2I]
    # (64-byte rounding on the CPU, 256 on CUDA), the rest unchanged
    base = None
    for ow in (False, True):
        rc, out, err = run(moe, "--preset", "qwen3-30b-a3b", "--tokens", "257",
                           "--json", *(["--overwrite-saved"] if ow else []))
        if not check("--overwrite-saved=%d: exits 0" % ow, rc == 0,
                     err.strip()):
            break
        j = json.loads(out)
        check("--overwrite-saved=%d: JSON says so" % ow,
              j["backward_overwrites_saved"] is ow, out.strip())
        if base is None:
            base = j
            continue
        dh = 257 * 8 * 2 * 768 * 2
        cut = base["bwd_workspace_bytes"] - j["bwd_workspace_bytes"]
        check("--overwrite-saved: backward workspace [T*k, 2I] smaller",
              dh <= cut <= dh + 256 and
              all(j[f] == base[f] for f in ("saved_bytes",
                                            "fwd_workspace_bytes",
                                            "infer_workspace_bytes")),
              "cut %d, dH %d" % (cut, dh))
    # --memory: desc.memory reaches the plan and its JSON; the CPU layer has
    # no passes to trade, so its sizes are the same under each policy
    sizes = {}
    for m in ("balanced", "lean", "fast"):
        rc, out, err = run(moe, "--preset", "qwen3-30b-a3b", "--tokens", "257",
                           "--json", "--memory", m)
        if check("--memory %s: exits 0" % m, rc == 0, err.strip()):
            j = json.loads(out)
            check("--memory %s: JSON says so" % m, j["memory"] == m,
                  out.strip())
            sizes[m] = tuple(j[f] for f in ("saved_bytes",
                                             "fwd_workspace_bytes",
                                             "bwd_workspace_bytes",
                                             "infer_workspace_bytes"))
    check("--memory: the CPU layer's sizes the same under each policy",
          len(set(sizes.values())) == 1, repr(sizes))
    rc, out, err = run(moe, "--experts", "8", "--hidden", "64", "--top-k", "9",
                       "--intermediate", "32")
    check("top-k above experts: exit 1 naming top_k",
          rc == 1 and "top_k" in err and out == "",
          "rc %d, stderr %r" % (rc, err[:200]))

    for args, word in ((["--hidden", "64"], "--preset"),
                       (["--top-k", "0"], "--top-k"),
                       (["--gpu", "h300"], "--gpu"),
                       (["--memory", "tiny"], "--memory"),
                       (["--device", "tpu"], "--device"),
                       (["--device", "cpu", "--gpu", "h100"], "--device cpu"),
                       (["--gpu"], "--gpu")):
        rc, out, err = run(moe, *([] if args[0] == "--hidden" else
                                  ["--preset", "tiny"]), *args)
        check("usage error %s: exit 2 naming %s" % (" ".join(args), word),
              rc == 2 and word in err, "rc %d, stderr %r" % (rc, err[:200]))
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
