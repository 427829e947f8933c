"""The checkpoint reader: the safetensors layout read with plain file reads (no memory map)."""
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from onecomp_core.errors import OnecompError
from onecomp_core.lazy_weights import LazyWeights

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6),
       st.integers(0, 2**31 - 1))
def test_every_tensor_reads_back_as_safetensors_wrote_it(tmp_path_factory, specs, seed):
    folder = tmp_path_factory.mktemp("w")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        t = torch.randint(-100, 100, shape, generator=g)
        tensors[f"t{i}"] = (t > 0) if dtype == torch.bool else (t.abs() if dtype == torch.uint8 else t).to(dtype)
    save_file(dict(list(tensors.items())[::2]), str(folder / "a.safetensors"))
    save_file(dict(list(tensors.items())[1::2]) or {"x": torch.zeros(1)}, str(folder / "b.safetensors"),
              metadata={"format": "pt"})
    w = LazyWeights(folder)
    for k, t in tensors.items():
        got = w.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        assert w.shape_of(k) == tuple(t.shape) and w.dtype_of(k) == t.dtype and w.numel(k) == t.numel()
        into = torch.empty_like(t)
        assert w.read_into(k, into) is into and torch.equal(into, t)


def test_damaged_files_and_wrong_targets_are_named(tmp_path):
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(tmp_path / "m.safetensors"))
    good = (tmp_path / "m.safetensors").read_bytes()
    w = LazyWeights(tmp_path)
    with pytest.raises(ValueError, match="read_into"):
        w.read_into("w", torch.empty(3, 4, dtype=torch.float64))
    with pytest.raises(OnecompError, match="'v' is missing"):
        w.get("v")
    (tmp_path / "m.safetensors").write_bytes(good[:-8])                 # data cut short
    with pytest.raises(OnecompError, match="corrupt safetensors file .*(outside the file|truncated)"):
        LazyWeights(tmp_path).get("w")
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 10**9) + good[8:])     # header past the end
    with pytest.raises(OnecompError, match="corrupt safetensors file .*header length"):
        LazyWeights(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(good[:8] + b"[" + good[9:])       # not JSON
    with pytest.raises(OnecompError, match="corrupt safetensors file"):
        LazyWeights(tmp_path)
