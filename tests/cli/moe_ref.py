"""Independent float64 NumPy reference of the Hugging Face Qwen3-MoE sparse
MoE block (router + experts), forward and a hand-written backward.

Weights are logical: W_gate_up [E, 2I, H] (gate rows, then up rows) and
W_down [E, H, I], as Hugging Face stores them ("out, in").
The backward differentiates L = sum(out * grad_output).
"""
import numpy as np


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def route(x, wg, top_k, norm_topk_prob):
    """Returns logits [T,E], p [T,E], topk indices [T,k], weights [T,k]."""
    logits = x @ wg.T
    z = logits - logits.max(axis=1, keepdims=True)
    ez = np.exp(z)
    p = ez / ez.sum(axis=1, keepdims=True)
    # Descending p; a stable sort keeps the lower expert index first on ties.
    idx = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, axis=1)
    if norm_topk_prob:
        w = w / w.sum(axis=1, keepdims=True)
    return logits, p, idx, w


def forward(x, wg, w_gate_up, w_down, top_k, norm_topk_prob, keep=False):
    x = np.asarray(x, np.float64)
    T, H = x.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    logits, p, idx, w = route(x, wg, top_k, norm_topk_prob)
    out = np.zeros((T, H))
    cache = []
    for t in range(T):
        for j in range(top_k):
            e = idx[t, j]
            gu = w_gate_up[e] @ x[t]
            g, u = gu[:inter], gu[inter:]
            s = _sigmoid(g)
            h = g * s * u
            y = w_down[e] @ h
            out[t] += w[t, j] * y
            if keep:
                cache.append((t, j, e, g, u, s, h, y))
    res = {"output": out, "router_logits": logits, "p": p, "topk": idx,
           "weights": w}
    if keep:
        res["cache"] = cache
    return res


def backward(x, wg, w_gate_up, w_down, top_k, norm_topk_prob, grad_output):
    """Gradients of sum(out * grad_output) for every input."""
    x = np.asarray(x, np.float64)
    dout = np.asarray(grad_output, np.float64)
    f = forward(x, wg, w_gate_up, w_down, top_k, norm_topk_prob, keep=True)
    T, H = x.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    dx = np.zeros_like(x)
    dgu = np.zeros_like(w_gate_up, dtype=np.float64)
    dd = np.zeros_like(w_down, dtype=np.float64)
    dw = np.zeros((T, top_k))  # d L / d (routing weight w[t, j])
    w = f["weights"]
    for (t, j, e, g, u, s, h, y) in f["cache"]:
        dw[t, j] = dout[t] @ y
        dy = w[t, j] * dout[t]
        dd[e] += np.outer(dy, h)
        dh = w_down[e].T @ dy
        dsilu = s * (1.0 + g * (1.0 - s))  # d/dg of g * sigmoid(g)
        dg = dh * u * dsilu
        du = dh * g * s
        dgate_up = np.concatenate([dg, du])
        dgu[e] += np.outer(dgate_up, x[t])
        dx[t] += w_gate_up[e].T @ dgate_up
    # Routing weights -> selected probabilities.
    p, idx = f["p"], f["topk"]
    psel = np.take_along_axis(p, idx, axis=1)
    if norm_topk_prob:
        ssum = psel.sum(axis=1, keepdims=True)
        # w_j = p_j / S: dp_j = (dw_j - sum_i dw_i w_i) / S
        dpsel = (dw - (dw * w).sum(axis=1, keepdims=True)) / ssum
    else:
        dpsel = dw
    dp = np.zeros_like(p)
    np.put_along_axis(dp, idx, dpsel, axis=1)  # only top-k entries
    # Softmax backward.
    dlogits = p * (dp - (dp * p).sum(axis=1, keepdims=True))
    dwg = dlogits.T @ x
    dx += dlogits @ wg
    return f, {"grad.hidden_states": dx, "grad.gate.weight": dwg,
               "grad.experts.gate_up_proj": dgu,
               "grad.experts.down_proj": dd}
