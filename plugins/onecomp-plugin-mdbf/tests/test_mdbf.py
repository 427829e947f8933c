import torch

from onecomp_core.sdk import LayerSpec, load_plugins
from onecomp_plugin_mdbf.plugin import MDBF, MDBFFormat
from onecomp_plugins_dbf import DBF, DBFFormat


def test_found_by_name():
    reg = load_plugins().registry
    assert reg.source("format", "mdbf") == "mdbf" and reg.source("projector", "mdbf") == "mdbf"


def test_mdbf_with_l1_is_dbf():
    torch.manual_seed(0)
    W = torch.randn(32, 48)
    H = torch.diag(torch.rand(48) + 0.5)
    a = DBF().project(W, H, LayerSpec(name="m", format="dbf", options={"bpw": 1.5}), DBFFormat())
    fmt = MDBFFormat(MDBFFormat.Options(l=1))
    b = MDBF(MDBF.Options(l=1)).project(W, H, LayerSpec(name="m", format="mdbf", options={"bpw": 1.5}), fmt)
    assert b.l == 1 and b.k == a.k
    assert torch.equal(a.dequantize(), b.dequantize())


def test_zero_extra_envelope_columns_store_the_dbf_layer_exactly():
    """MDBF contains DBF: padding a DBF layer's envelopes with zero columns changes nothing,
    through the format's save/load and its inference module."""
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    a = DBF().project(W, None, LayerSpec(name="m", format="dbf", options={"bpw": 2.0}), DBFFormat())
    Sa, A, P, Sb, B, G = a.Sa, a.A, a.P, a.Sb, a.B, a.G
    z = lambda E: torch.cat([E, torch.zeros(E.shape[0], 2)], 1)
    fmt = MDBFFormat(MDBFFormat.Options(l=3))
    b = fmt.make(Sa, z(A), z(P), Sb, z(B), z(G))
    back = fmt.from_tensors("m", fmt.to_tensors("m", b, torch.float32), {})
    assert back.l == 3
    torch.testing.assert_close(back.dequantize(), a.dequantize())
    x = torch.randn(5, 40)
    torch.testing.assert_close(fmt.module(back)(x), x @ a.dequantize().T, rtol=1e-4, atol=1e-4)


def test_best_envelope_rank_keeps_the_least_weighted_error_and_counts_its_bits():
    from onecomp_plugins_dbf.factors import Metric, bits_per_weight
    torch.manual_seed(1)
    W = torch.randn(64, 96) @ torch.diag(torch.linspace(2, 0.1, 96))
    X = torch.randn(300, 96)
    H = X.T @ X / 300
    spec = LayerSpec(name="m", format="mdbf", options={"bpw": 2.0})
    fmt = MDBFFormat(MDBFFormat.Options(l=3))
    m = Metric.of(H, 96, W.device)
    fixed = {l: MDBF(MDBF.Options(l=l, envelope="fixed", iters=10)).project(W, H, spec, fmt) for l in (1, 2, 3)}
    errs = {l: m.error(W, *t.factors()) for l, t in fixed.items()}
    best = MDBF(MDBF.Options(l=3, envelope="best", iters=10)).project(W, H, spec, fmt)
    chosen = min(errs, key=errs.get)
    assert best.l == chosen and m.error(W, *best.factors()) == errs[chosen]
    assert fmt.stored_bits_per_weight(spec, (64, 96), best) == bits_per_weight(64, 96, best.k, best.l) <= 2.0
    assert len(set(errs.values())) == 3        # the candidates really differ


def test_no_room_for_any_envelope_rank_is_a_clear_error():
    import pytest
    from onecomp_core.sdk import OnecompError
    spec = LayerSpec(name="m", format="mdbf", options={"bpw": 0.3})
    with pytest.raises(OnecompError, match="no room for envelope rank 2"):
        MDBF(MDBF.Options(envelope="best")).project(torch.randn(8, 8), None, spec, MDBFFormat())
