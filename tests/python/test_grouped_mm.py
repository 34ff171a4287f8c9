"""libmoe.torch.grouped_mm against torch._grouped_mm's whole contract.

PyTorch's own grouped_mm tests (test/test_matmul_cuda.py, test_matmul.py:
test_grouped_gemm_{2d_2d,2d_3d,3d_3d,3d_2d}) replayed in our words with
their parameters: every variant, bf16 / f32 / f16, operands row- or
column-major, contiguous or strided (gapped) views, and for the row- and
column-grouped variants an empty group. Each case is checked against a
float64 reference, the gradients against torch autograd of that reference,
and each gradient's strides against its operand's. PyTorch's sizes
(m, n, k, G = 16, 32, 64, 4) are all powers of two, so every case also runs
at odd sizes with uneven groups and a tail past offs[-1]."""

import logging

import pytest
import torch
import torch.nn.functional as F

import libmoe.torch as lt
from conftest import DEVICE, rel

DTYPES = [torch.bfloat16, torch.float32, torch.float16]
# relative to the reference's largest |value|: f32 sums in another order
# (1e-5 CPU, 1e-4 on the GPU's tensor-core tiles); bf16 and f16 round each
# operand and the output (8 and 11 significant bits).
TOL = {torch.float32: 1e-5 if DEVICE.type == "cpu" else 1e-4,
       torch.bfloat16: 2e-2, torch.float16: 3e-3}
# PyTorch's sizes, and odd ones: (m, n, k, groups)
SIZES = {"torch": (16, 32, 64, 4), "odd": (13, 19, 37, 5)}


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def _offsets(total_per_group, groups, odd, empty):
    """int32 cumulative ends. torch's: (g+1) * size, with group 0 emptied
    by offs[0] = offs[1] when `empty` (its check_zero_size). Odd: uneven
    sizes summing below the extent (a tail past offs[-1]); `empty` then
    empties the first and the middle group."""
    if not odd:
        o = [total_per_group * (g + 1) for g in range(groups)]
        if empty:
            o[0] = o[1]
        return torch.tensor(o, dtype=torch.int32, device=DEVICE)
    extent = total_per_group * groups
    sizes = [(3 * g + 5) % (2 * total_per_group) + 1 for g in range(groups)]
    if empty:
        sizes[0] = 0
        sizes[groups // 2] = 0
    o, acc = [], 0
    for s in sizes:
        acc = min(acc + s, extent - 2)  # always leave a tail of >= 2
        o.append(acc)
    return torch.tensor(o, dtype=torch.int32, device=DEVICE)


def _operand(shape_row_major, row_major, strided, dtype, group_dim=False):
    """A 2-D / 3-D operand of logical shape `shape_row_major` (last two dims
    (rows, cols)) as torch's tests make it: row-major or a transposed view of
    column storage, and with strided=True a gapped view (every 2nd batch,
    a wider buffer's first columns/rows)."""
    s = int(strided)
    if len(shape_row_major) == 3:
        G, r, c = shape_row_major
        if row_major:
            t = _randn(G * (1 + s), r, c * (1 + s), dtype=dtype)
            return t[::1 + s, :, :c]
        t = _randn(G * (1 + s), c * (1 + s), r, dtype=dtype).transpose(-2, -1)
        return t[::1 + s, :, :c]
    r, c = shape_row_major
    if group_dim == "cols":  # grouped along columns: gap after them
        if row_major:
            return _randn(r, c + 3 * s, dtype=dtype)[:, :c]
        return _randn(c + 3 * s, r, dtype=dtype).t()[:, :c]
    if row_major:  # grouped along rows (or not grouped)
        return _randn(r, c * (1 + s), dtype=dtype)[:, :c]
    return _randn(c, r + 2 * s * r, dtype=dtype).t()[:r, :]


def ref_grouped_mm(a, b, offs):
    """float64 per-group products, differentiable; unowned parts are 0."""
    kind = f"{a.dim()}d{b.dim()}d"
    if kind == "3d3d":
        return torch.bmm(a, b)
    o = [0] + [int(v) for v in offs.cpu()]
    G = len(o) - 1
    if kind == "2d3d":
        parts = [a[o[g]:o[g + 1]] @ b[g] for g in range(G)]
        parts.append(a[o[-1]:] @ torch.zeros_like(b[0]))
        return torch.cat(parts, 0)
    if kind == "2d2d":
        return torch.stack([a[:, o[g]:o[g + 1]] @ b[o[g]:o[g + 1]]
                            for g in range(G)])
    parts = [a[g] @ b[:, o[g]:o[g + 1]] for g in range(G)]
    parts.append(a[0] @ torch.zeros_like(b[:, o[-1]:]))
    return torch.cat(parts, 1)


def is_non_overlapping_and_dense(t):
    """Its elements fill a block of memory exactly once (any dim order)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def _grad_strides(t):
    """The strides a leaf's .grad has when the op returns its gradient in
    the leaf's strides: those strides for a dense leaf (row- or column-major,
    any order); for a gapped view AccumulateGrad's layout contract makes the
    stored .grad row-major, as for torch's own operator."""
    if is_non_overlapping_and_dense(t):
        return t.stride()
    return torch.empty(t.shape).stride()


def _check(a, b, offs, dtype, backward=True):
    if dtype not in lt._GMM_DTYPES[DEVICE.type]:
        pytest.skip(f"libmoe's {DEVICE.type} grouped GEMM declines {dtype} "
                    "(the call goes to torch's own operator)")
    assert lt.grouped_mm_decline_reason(a, b, offs) is None
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    out = lt.grouped_mm(a, b, offs)
    ad = a.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    ref = ref_grouped_mm(ad, bd, offs)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = TOL[dtype]
    assert rel(out, ref) <= tol, f"out: {rel(out, ref):.3g}"
    if not backward:
        return
    gO = torch.rand_like(out)
    out.backward(gO)
    ref.backward(gO.double())
    assert rel(a.grad, ad.grad) <= tol, f"grad a: {rel(a.grad, ad.grad):.3g}"
    assert rel(b.grad, bd.grad) <= tol, f"grad b: {rel(b.grad, bd.grad):.3g}"
    # each gradient in its operand's strides (column-major stays so)
    assert a.grad.stride() == _grad_strides(a), (a.grad.stride(), a.stride())
    assert b.grad.stride() == _grad_strides(b), (b.grad.stride(), b.stride())


FLAGS = [(s, ar, br) for s in (False, True) for ar in (False, True)
         for br in (False, True)]
FLAG_IDS = [f"{'strided' if s else 'dense'}-a{'row' if ar else 'col'}"
            f"-b{'row' if br else 'col'}" for s, ar, br in FLAGS]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided,a_row,b_row", FLAGS, ids=FLAG_IDS)
def test_2d_2d(strided, a_row, b_row, dtype, size):
    """K grouped: out[g] = a[:, K_g] . b[K_g, :], [G, M, N]."""
    m, n, k, G = SIZES[size]
    a = _operand((m, k * G), a_row, strided, dtype, group_dim="cols")
    # torch passes b as the transpose of an [N, K_total] operand
    b = _operand((n, k * G), b_row, strided, dtype, group_dim="cols").t()
    _check(a, b, _offsets(k, G, size == "odd", False), dtype)


@pytest.mark.parametrize("empty", [False, True], ids=["full", "empty_group"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided,a_row,b_row", FLAGS, ids=FLAG_IDS)
def test_2d_3d(strided, a_row, b_row, dtype, size, empty):
    """Rows grouped: out[M_g] = a[M_g] . b[g], [M_total, N] (the MoE
    forward; b is torch's w.transpose(-2, -1) of [G, N, K] weights)."""
    m, n, k, G = SIZES[size]
    a = _operand((m * G, k), a_row, strided, dtype)
    b = _operand((G, n, k), b_row, strided, dtype).transpose(-2, -1)
    _check(a, b, _offsets(m, G, size == "odd", empty), dtype)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided,a_row,b_row", FLAGS, ids=FLAG_IDS)
def test_3d_3d(strided, a_row, b_row, dtype, size):
    """Batched: out[g] = a[g] . b[g], [G, M, N], no offsets."""
    m, n, k, G = SIZES[size]
    a = _operand((G, m, k), a_row, strided, dtype)
    b = _operand((G, n, k), b_row, strided, dtype).transpose(-2, -1)
    _check(a, b, None, dtype)


@pytest.mark.parametrize("empty", [False, True], ids=["full", "empty_group"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided,a_row,b_row", FLAGS, ids=FLAG_IDS)
def test_3d_2d(strided, a_row, b_row, dtype, size, empty):
    """Columns of b grouped: out[:, N_g] = a[g] . b[:, N_g], [M, N_total]."""
    m, n, k, G = SIZES[size]
    a = _operand((G, m, k), a_row, strided, dtype)
    b = _operand((n * G, k), b_row, strided, dtype).t()
    _check(a, b, _offsets(n, G, size == "odd", empty), dtype)


# ---- beyond torch's cases ----------------------------------------------------


@pytest.mark.parametrize("kind", ["2d3d", "2d2d", "3d2d", "3d3d"])
def test_one_group_takes_all_and_single_operand_grad(kind):
    """One group owns the whole grouped dimension, the others are empty;
    and a gradient asked for one operand only."""
    m, n, k, G = 11, 9, 17, 3
    f = torch.float32
    if kind == "2d3d":
        a, b = _randn(m, k, dtype=f), _randn(G, k, n, dtype=f)
        offs = torch.tensor([0, m, m], dtype=torch.int32, device=DEVICE)
    elif kind == "2d2d":
        a, b = _randn(m, k, dtype=f), _randn(k, n, dtype=f)
        offs = torch.tensor([0, 0, k], dtype=torch.int32, device=DEVICE)
    elif kind == "3d2d":
        a, b = _randn(G, m, k, dtype=f), _randn(k, n, dtype=f)
        offs = torch.tensor([n, n, n], dtype=torch.int32, device=DEVICE)
    else:
        a, b, offs = _randn(G, m, k, dtype=f), _randn(G, k, n, dtype=f), None
    _check(a, b, offs, f)
    b = b.detach().requires_grad_()
    out = lt.grouped_mm(a.detach(), b, offs)
    out.backward(torch.ones_like(out))  # an expanded (stride-0) gradient
    bd = b.detach().double().requires_grad_()
    ref_grouped_mm(a.double(), bd, offs).sum().backward()
    assert rel(b.grad, bd.grad) <= TOL[f]


def test_tail_past_offsets_is_zero():
    """torch leaves rows past offs[-1] undefined; libmoe writes zeros and
    gives those input rows zero gradient."""
    a = _randn(20, 7, dtype=torch.float32).requires_grad_()
    b = _randn(2, 7, 5, dtype=torch.float32).requires_grad_()
    offs = torch.tensor([4, 9], dtype=torch.int32, device=DEVICE)
    out = lt.grouped_mm(a, b, offs)
    assert torch.equal(out[9:], torch.zeros_like(out[9:]))
    out.backward(torch.rand_like(out))
    assert torch.equal(a.grad[9:], torch.zeros_like(a.grad[9:]))


def test_bad_input_is_a_clear_error():
    f = torch.float32
    a2, b3 = _randn(8, 6, dtype=f), _randn(2, 6, 4, dtype=f)
    offs = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="need offs"):
        lt.grouped_mm(a2, b3)
    with pytest.raises(ValueError, match="offs must be None"):
        lt.grouped_mm(_randn(2, 8, 6, dtype=f), b3, offs)
    with pytest.raises(ValueError, match="contraction"):
        lt.grouped_mm(a2, _randn(2, 5, 4, dtype=f), offs)
    with pytest.raises(ValueError, match="groups"):
        lt.grouped_mm(a2, _randn(3, 6, 4, dtype=f), offs)
    with pytest.raises(TypeError, match="int32"):
        lt.grouped_mm(a2, b3, offs.long())
    with pytest.raises(ValueError, match="2-D or 3-D"):
        lt.grouped_mm(a2[0], b3, offs)
    if DEVICE.type == "cpu":  # CUDA reads offsets on the device only
        bad = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
        with pytest.raises(RuntimeError, match="offsets"):  # 9 > 8 rows
            lt.grouped_mm(a2, b3, bad)


def test_declines_to_torch_with_reason(caplog):
    """A bias or another out_dtype is not libmoe's to run: torch's own
    operator gets the call (and raises its own error for what it does not
    support either); the reason is logged once."""
    a = _randn(8, 16, dtype=torch.bfloat16)
    b = _randn(2, 16, 8, dtype=torch.bfloat16)
    offs = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    assert "bias" in lt.grouped_mm_decline_reason(a, b, offs, bias=b[0, 0])
    assert "out_dtype" in lt.grouped_mm_decline_reason(
        a, b, offs, out_dtype=torch.float32)
    assert "mixed" in lt.grouped_mm_decline_reason(a.float(), b, offs)
    with caplog.at_level(logging.WARNING, logger="libmoe.torch"):
        with pytest.raises(RuntimeError):  # torch: "Bias not supported yet"
            lt.grouped_mm(a, b, offs, bias=b[0, 0])
    assert any("bias" in r.getMessage() and "torch" in r.getMessage()
               for r in caplog.records)


def test_patch_grouped_mm():
    """patch_grouped_mm() routes torch._grouped_mm (and so
    F.grouped_mm) through libmoe; unpatch restores torch's."""
    orig = torch._grouped_mm
    a = _randn(12, 16, dtype=torch.float32)
    b = _randn(3, 16, 8, dtype=torch.float32)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32, device=DEVICE)
    lt.patch_grouped_mm()
    lt.patch_grouped_mm()  # idempotent
    try:
        assert torch._grouped_mm is lt.grouped_mm
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = F.grouped_mm(a, b, offs=offs)
        calls = [e.name for e in prof.events() if "libmoe::" in e.name]
    finally:
        lt.unpatch_grouped_mm()
    assert torch._grouped_mm is orig
    assert "libmoe::grouped_mm" in calls, calls
    assert rel(y, ref_grouped_mm(a.double(), b.double(), offs)) <= TOL[a.dtype]


@pytest.mark.parametrize("kind", ["2d3d", "2d2d", "3d2d", "3d3d"])
def test_opcheck(kind):
    from torch.library import opcheck
    f = torch.float32
    if kind == "2d3d":
        a, b = _randn(13, 7, dtype=f), _randn(3, 7, 5, dtype=f)
        offs = torch.tensor([2, 2, 13], dtype=torch.int32, device=DEVICE)
    elif kind == "2d2d":
        a, b = _randn(6, 13, dtype=f), _randn(13, 5, dtype=f)
        offs = torch.tensor([2, 2, 13], dtype=torch.int32, device=DEVICE)
    elif kind == "3d2d":
        a, b = _randn(3, 6, 7, dtype=f), _randn(7, 13, dtype=f)
        offs = torch.tensor([2, 2, 13], dtype=torch.int32, device=DEVICE)
    else:
        a, b, offs = _randn(3, 6, 7, dtype=f), _randn(3, 7, 5, dtype=f), None
    opcheck(torch.ops.libmoe.grouped_mm.default,
            (a.requires_grad_(), b.transpose(-2, -1).contiguous()
             .transpose(-2, -1).requires_grad_(), offs))


def test_f16_rounding_is_ieee():
    """Depth 1: every output is one exact f32 product of two f16 values,
    so libmoe's f16 result must equal torch's round-to-nearest-even of it
    bit for bit: normals, subnormals, overflow to inf, values that round to
    a signed zero; and every finite f16 value but -0 (63487 of them) times 1
    comes back unchanged: the widening and the narrowing are exact inverses.
    (-0 times 1 gives +0: the sum over k starts from +0, as in any GEMM.)"""
    if torch.float16 not in lt._GMM_DTYPES[DEVICE.type]:
        pytest.skip(f"libmoe's {DEVICE.type} grouped GEMM declines f16")
    g = torch.Generator().manual_seed(11)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    allh = bits.view(torch.float16)
    finite = allh[torch.isfinite(allh) & (bits != -32768)]
    one = torch.ones((1, 1, 1), dtype=torch.float16)
    offs = torch.tensor([finite.numel()], dtype=torch.int32)
    out = lt.grouped_mm(finite.view(-1, 1).to(DEVICE), one.to(DEVICE),
                        offs.to(DEVICE)).cpu().view(-1)
    assert torch.equal(out.view(torch.int16), finite.view(torch.int16))
    # random magnitudes from 2^-24 to 2^15 times factors around 1 and 2^-10
    # and 2^4: results that are subnormal, normal, and past 65504
    a = (torch.randn(50001, generator=g) * 2.0 ** torch.randint(
        -24, 16, (50001,), generator=g)).to(torch.float16)
    a = a[a != 0]  # inputs that were flushed to (-)0 already: see above
    n = a.numel()
    b = torch.tensor([[[1.2345]], [[-0.00098]], [[17.5]]],
                     dtype=torch.float16)
    offs = torch.tensor([n // 3, 2 * n // 3, n], dtype=torch.int32)
    out = lt.grouped_mm(a.view(-1, 1).to(DEVICE), b.to(DEVICE),
                        offs.to(DEVICE)).cpu().view(-1)
    o = [0] + offs.tolist()
    want = torch.cat([(a[o[i]:o[i + 1]].float() * b[i].float().view(()))
                      .half() for i in range(3)])
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_compile_fullgraph_every_variant():
    """torch.compile(fullgraph=True) through each variant, forward and
    backward, equal to eager; and a patched torch._grouped_mm compiles."""
    f32 = torch.float32

    def f(a, b, o):
        return lt.grouped_mm(a, b, o)

    cf = torch.compile(f, fullgraph=True, dynamic=False)
    cases = [((23, 13), (3, 13, 9), [5, 5, 20]),
             ((7, 30), (30, 9), [10, 10, 25]),
             ((3, 7, 13), (13, 20), [4, 4, 17]),
             ((3, 7, 13), (3, 13, 9), None)]
    for sa, sb, offs in cases:
        a = _randn(*sa, dtype=f32).requires_grad_()
        b = _randn(*sb, dtype=f32).requires_grad_()
        o = None if offs is None else torch.tensor(offs, dtype=torch.int32,
                                                   device=DEVICE)
        g = torch.rand(f(a, b, o).shape, device=DEVICE)
        y = cf(a, b, o)
        y.backward(g)
        a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
        y2 = f(a2, b2, o)
        y2.backward(g)
        assert torch.equal(y, y2), (sa, sb)
        assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
    lt.patch_grouped_mm()
    try:
        pf = torch.compile(lambda a, b, o: F.grouped_mm(a, b, offs=o),
                           fullgraph=True)
        a, b = _randn(23, 13, dtype=f32), _randn(3, 13, 9, dtype=f32)
        o = torch.tensor([5, 5, 20], dtype=torch.int32, device=DEVICE)
        assert torch.equal(pf(a, b, o), lt.grouped_mm(a, b, o))
    finally:
        lt.unpatch_grouped_mm()
