"""The allocation as a PNG heatmap (rows: blocks, columns: module kinds; colour: bits per
weight from red = 1 to green = 8, grey = not quantized), written with zlib alone."""
from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    h, w = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def colour(bpw: float | None, lo: float = 1.0, hi: float = 8.5) -> tuple[int, int, int]:
    if bpw is None:
        return (128, 128, 128)
    t = min(max((bpw - lo) / (hi - lo), 0.0), 1.0)
    return (int(230 * (1 - t) + 20), int(200 * t + 30), 40)


def allocation_png(grid_bpw: list[list[float | None]], cell: int = 12) -> bytes:
    """``grid_bpw[block][module]`` -> PNG bytes, each cell ``cell`` pixels square."""
    pixels = []
    for row in grid_bpw:
        line = []
        for v in row:
            line += [colour(v)] * (cell - 1) + [(255, 255, 255)]
        pixels += [line] * (cell - 1) + [[(255, 255, 255)] * len(line)]
    return png(pixels)
