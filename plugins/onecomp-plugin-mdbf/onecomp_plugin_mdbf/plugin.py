"""The ``mdbf`` format and projector: DBF's code with rank-l envelopes,
W ~ (S_a o (A P^T)) (S_b o (B G^T))^T. The envelope rank is the projector's and format's option
``l`` (set with --option mdbf.l=3); the factor rank k follows from the bpw target and l.
``envelope: fixed`` (default) fits l only; with ``best`` every envelope rank 1..l is fitted at
the module's bpw and the one with the least weighted error kept (a rank-1 envelope leaves room
for a larger k). Each module stores its own (k, l), so the checkpoint is self-describing."""
from __future__ import annotations

import attrs

from onecomp_core.sdk import hookimpl, in_range, one_of
from onecomp_plugins_dbf import DBF, BinaryFactorOptions, DBFFormat, Metric, input_weighting, project_binary_factors


@attrs.define(frozen=True)
class MDBFFormatOptions:
    l: int = attrs.field(default=2, validator=in_range(1, 64))


class MDBFFormat(DBFFormat):
    name = "mdbf"
    fixed_l = None
    Options = MDBFFormatOptions

    def envelope_rank(self, spec) -> int:
        return int(spec.options.get("l", self.options.l))


@attrs.define(frozen=True)
class MDBFOptions(BinaryFactorOptions):
    l: int = attrs.field(default=2, validator=in_range(1, 64))   # the same table configures the format
    envelope: str = attrs.field(default="fixed", validator=one_of("best", "fixed"))


class MDBF(DBF):
    name = "mdbf"
    Options = MDBFOptions
    writes = (MDBFFormat, DBFFormat)

    def project(self, W, H, spec, fmt):
        self.check(spec, fmt)
        top = int(spec.options.get("l", self.options.l))
        ranks = range(1, top + 1) if self.options.envelope == "best" else [top]
        metric = Metric.of(input_weighting(self.options, H), W.shape[1], W.device, self.options.damp)
        best = None
        for l in ranks:
            s = attrs.evolve(spec, options={**spec.options, "l": l})
            if fmt.rank(s, tuple(W.shape)) < 1:
                continue
            t = project_binary_factors(self.options, fmt, W, H, s)
            err = metric.error(W.float(), *t.factors())          # ||(W - L R^T) H^1/2||^2
            if best is None or err < best[0]:
                best = (err, t)
        if best is None:
            fmt.fail(f"{spec.options.get('bpw')} bits per weight leave no room for envelope rank {top} of "
                     f"{spec.name} {tuple(W.shape)}; raise --target-bpw or lower mdbf.l")
        return best[1]


@hookimpl
def onecomp_register_formats(registry):
    registry.add_format(MDBFFormat)


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(MDBF)
