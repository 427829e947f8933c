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


def test_more_envelope_rank_fits_better_at_the_same_bpw():
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(64, 96, generator=g) @ torch.diag(torch.linspace(2, 0.05, 96)) @ torch.randn(96, 96, generator=g)) / 10
    H = torch.eye(96)
    errs = {}
    for l in (1, 2):
        fmt = MDBFFormat(MDBFFormat.Options(l=l))
        t = MDBF(MDBF.Options(l=l)).project(W, H, LayerSpec(name="m", format="mdbf", options={"bpw": 2.0}), fmt)
        errs[l] = float(((W - t.dequantize()) ** 2).sum())
    assert errs[2] <= errs[1] * 1.02, errs
