"""PNG grids with the standard library only (the runtime has no Pillow): 8-bit grey or RGB,
with a ``Software`` text chunk that marks the file as ours, so a later run may replace it."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

SOFTWARE = "dmcompile"  # the same tag dmcompile's own grids carry


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, software: str = SOFTWARE) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) -> PNG bytes."""
    a = np.ascontiguousarray(pixels, np.uint8)
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"pixels must be [H, W] or [H, W, 3], got {list(a.shape)}")
    h, w = a.shape[:2]
    rows = a.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + _chunk(b"tEXt", b"Software\x00" + software.encode("latin-1"))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def png_software(path: Path) -> str | None:
    """The ``Software`` text of a PNG file, None if it is not a PNG or has none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    i = 8
    while i + 8 <= len(data):
        n, kind = struct.unpack(">I", data[i:i + 4])[0], data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        if kind == b"tEXt" and body.startswith(b"Software\x00"):
            return body[len(b"Software\x00"):].decode("latin-1")
        if kind == b"IEND":
            break
        i += 12 + n
    return None


def grid(images_u8: np.ndarray, cols: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [N, C, H, W] -> one [H', W'] (C < 3: channel 0) or [H', W', 3] image: ``cols``
    columns (default about square), white padding, enlarged by ``scale`` (default: to about 512
    pixels wide)."""
    imgs = images_u8[:, :3] if images_u8.shape[1] >= 3 else images_u8[:, :1]
    n, c, h, w = imgs.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = imgs[i].transpose(1, 2, 0)
    scale = scale or max(1, round(512 / canvas.shape[1]))
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas[..., 0] if c == 1 else canvas


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write via a temporary file and rename (no half-written output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}.png")
    try:
        tmp.write_bytes(encode_png(pixels))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
