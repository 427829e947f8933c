import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from hypothesis import given, settings, strategies as st

from onecomp_core.formats.packing import pack_rows, packed_width, unpack_rows


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_round_trip_every_width(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, packed_width(cols, bits))
    assert torch.equal(unpack_rows(packed, bits, cols).long(), codes)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), cols=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_layout_is_compressed_tensors_pack_quantized(bits, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, cols), generator=g)
    theirs = pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(pack_rows(codes, bits), theirs)


def test_out_of_range_codes_are_refused():
    import pytest
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_rows(torch.zeros(1, 3, dtype=torch.int32), 4, 64)
