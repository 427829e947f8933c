"""Plugin glue: the ``dbf`` format and projector."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.sdk import Projector, hookimpl, in_range, one_of

from .factors import fit
from .fmt import DBFFormat
from .sinkhorn import balance


@attrs.define(frozen=True)
class BinaryFactorOptions:
    iters: int = attrs.field(default=40, validator=in_range(0, 10_000))
    rho: float = attrs.field(default=0.02, validator=in_range(1e-6, 1e6))
    rho_end: float = attrs.field(default=4.0, validator=in_range(1e-6, 1e6))
    polish: int = attrs.field(default=16, validator=in_range(0, 1000))
    activation: str = attrs.field(default="full", validator=one_of("full", "diag", "none"))
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 1.0))
    sinkhorn: str = attrs.field(default="none", validator=one_of("none", "l1", "l2"))
    sinkhorn_iters: int = attrs.field(default=10, validator=in_range(1, 1000))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))


def input_weighting(o: BinaryFactorOptions, H):
    """What the fit weights the inputs by: None (Frobenius), diag(H) or H, per ``activation``."""
    if H is None or o.activation == "none":
        return None
    return H.float().clone() if o.activation == "full" else torch.diagonal(H).float().clone()


def project_binary_factors(o: BinaryFactorOptions, fmt, W, H, spec):
    """Sinkhorn (optional) -> SVD/SVID start -> ADMM, activation-aware with H or diag(H)."""
    k, l = fmt.rank(spec, tuple(W.shape)), fmt.envelope_rank(spec)
    d = input_weighting(o, H)
    Wf, r, c = (W.float(), None, None)
    if o.sinkhorn != "none":
        Wf, r, c = balance(W, 1 if o.sinkhorn == "l1" else 2, o.sinkhorn_iters)
        # the error is measured on W = W' diag(c): weights diag(c) H diag(c)
        d = c * c if d is None else d * c * c if d.dim() == 1 else c[:, None] * d * c[None, :]
    Sa, A, P, Sb, B, G = fit(Wf, k, l, d, iters=o.iters, rho=o.rho, rho_end=o.rho_end, polish=o.polish, seed=o.seed, damp=o.damp)
    if r is not None:
        A, B = A * r[:, None], B * c[:, None]
    return fmt.make(Sa, A, P, Sb, B, G)


class DBF(Projector):
    """Double binary factorisation: SVID start, alternating ADMM on the two factors."""
    name = "dbf"
    Options = BinaryFactorOptions
    writes = (DBFFormat,)

    def project(self, W, H, spec, fmt):
        self.check(spec, fmt)
        return project_binary_factors(self.options, fmt, W, H, spec)


@hookimpl
def onecomp_register_formats(registry):
    registry.add_format(DBFFormat)


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(DBF)
