import torch

from onecomp_core.plugins import load_plugins
from onecomp_core.spec import LayerSpec
from onecomp_plugin_mdbf.plugin import MDBF, MDBFFormat
from onecomp_plugins_dbf.fmt import DBFFormat
from onecomp_plugins_dbf.plugin import DBF


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
