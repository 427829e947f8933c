"""The ``mdbf`` format and projector: DBF's code with rank-l envelopes,
W ~ (S_a o (A P^T)) (S_b o (B G^T))^T. The envelope rank is the projector's and format's option
``l`` (set with --option mdbf.l=3); the factor rank k follows from the bpw target and l."""
from __future__ import annotations

import attrs

from onecomp_core.hookspecs import hookimpl
from onecomp_core.validators import in_range
from onecomp_plugins_dbf.fmt import DBFFormat
from onecomp_plugins_dbf.plugin import DBF, BinaryFactorOptions


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


class MDBF(DBF):
    name = "mdbf"
    Options = MDBFOptions

    def project(self, W, H, spec, fmt):
        spec = attrs.evolve(spec, options={**spec.options, "l": spec.options.get("l", self.options.l)})
        return super().project(W, H, spec, fmt)


@hookimpl
def onecomp_register_formats(registry):
    registry.add_format(MDBFFormat)


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(MDBF)
