import math

import numpy as np
import pytest
import torch

from fxcompress.quant import lsq_fake_quant, lsq_grad_scale


def ste_reference(x, s, b, qmin, qmax):
    """LSQ+ written with a straight-through round: autograd of this is the papers' gradient."""
    v = (x - b) / s if b is not None else x / s
    vc = torch.clamp(v, qmin, qmax)
    q = vc + (torch.round(vc) - vc).detach()
    return q * s + b if b is not None else q * s


def numpy_grads(x, s, b, g, qmin, qmax):
    """The hand-derived gradients (LSQ eq. 3 and LSQ+'s offset gradient), elementwise then summed."""
    v = (x - b) / s
    inside = (v >= qmin) & (v <= qmax)
    dx = g * inside
    ds = np.where(inside, np.round(v) - v, np.where(v < qmin, qmin, qmax)) * g
    db = np.where(inside, 0.0, 1.0) * g
    return dx, ds.sum(axis=-1, keepdims=True), db.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, False), (8, True)])
def test_lsq_plus_gradients_match_references(bits, signed):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = torch.rand(5, 1, dtype=torch.float64) * 0.3 + 0.05
    b = torch.randn(5, 1, dtype=torch.float64) * 0.5
    v = torch.randn(5, 32, dtype=torch.float64) * (qmax - qmin) * 0.5 + (qmin + qmax) / 2
    x = v * s + b  # about a third of the values fall outside the clip range
    g = torch.randn(5, 32, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, s, b)]
    out = lsq_fake_quant(*leaves, qmin, qmax)
    out.backward(g)
    ref_leaves = [t.clone().requires_grad_() for t in (x, s, b)]
    ref = ste_reference(*ref_leaves, qmin, qmax)
    ref.backward(g)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, r in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, r.grad, atol=1e-10)
    dx, ds, db = numpy_grads(x.numpy(), s.numpy(), b.numpy(), g.numpy(), qmin, qmax)
    assert np.allclose(leaves[0].grad.numpy(), dx) and np.allclose(leaves[1].grad.numpy(), ds)
    assert np.allclose(leaves[2].grad.numpy(), db)
    # the clip range is exercised on both sides
    v = (x - b) / s
    assert (v < qmin).any() and (v > qmax).any()


def test_lsq_symmetric_and_grad_scale():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    s = torch.full((4, 1), 0.2, dtype=torch.float64, requires_grad=True)
    gs = lsq_grad_scale(16, 7)
    assert math.isclose(gs, 1 / math.sqrt(16 * 7))
    lsq_fake_quant(x, s, None, -8, 7, grad_scale=gs).sum().backward()
    s2 = s.detach().clone().requires_grad_()
    ste_reference(x.detach(), s2, None, -8, 7).sum().backward()
    assert torch.allclose(s.grad, s2.grad * gs)
    # forward equals round-to-nearest on the grid
    q = torch.clamp(torch.round(x / s), -8, 7) * s
    assert torch.equal(lsq_fake_quant(x, s, None, -8, 7), q)

