"""A small baseline-JPEG decoder (numpy), for the photos that ship inside scikit-learn.

Pillow is not a dependency of fxcompress, and scikit-learn needs it to read its own sample photos.
This decoder covers what those files use: baseline sequential DCT (SOF0), 8-bit, Huffman coding,
1 or 3 components with any sampling factors, restart intervals.  Progressive / arithmetic-coded /
12-bit files raise a ValueError that says so.  It only parses bytes (never runs code from the file).
"""
from __future__ import annotations

import numpy as np

_ZIGZAG = np.array([0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
                    20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58,
                    59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63])


def _idct_matrix() -> np.ndarray:
    k = np.arange(8)
    c = np.where(k == 0, np.sqrt(1 / 8), np.sqrt(2 / 8))
    return c[:, None] * np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16)  # (u, x)


class _Bits:
    """MSB-first bit reader over entropy-coded data (0xFF00 stuffing removed, restart markers split)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.acc, self.n = data, 0, 0, 0

    def bit(self) -> int:
        if self.n == 0:
            self.acc = self.data[self.pos] if self.pos < len(self.data) else 0
            self.pos += 1
            self.n = 8
        self.n -= 1
        return (self.acc >> self.n) & 1

    def bits(self, k: int) -> int:
        v = 0
        for _ in range(k):
            v = (v << 1) | self.bit()
        return v


def _huffman(counts, symbols) -> dict:
    table, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            table[(length, code)] = symbols[k]
            code += 1
            k += 1
        code <<= 1
    return table


def _decode_symbol(br: _Bits, table: dict) -> int:
    code = 0
    for length in range(1, 17):
        code = (code << 1) | br.bit()
        s = table.get((length, code))
        if s is not None:
            return s
    raise ValueError("corrupt JPEG: invalid Huffman code")


def _extend(v: int, t: int) -> int:
    return v - (1 << t) + 1 if t and v < (1 << (t - 1)) else v


def _unstuff(seg: bytes) -> list[bytes]:
    """Split entropy-coded data at restart markers and remove 0xFF00 stuffing."""
    parts, cur, i = [], bytearray(), 0
    while i < len(seg):
        b = seg[i]
        if b == 0xFF and i + 1 < len(seg):
            nxt = seg[i + 1]
            if nxt == 0:
                cur.append(0xFF)
                i += 2
                continue
            if 0xD0 <= nxt <= 0xD7:
                parts.append(bytes(cur))
                cur = bytearray()
                i += 2
                continue
        cur.append(b)
        i += 1
    parts.append(bytes(cur))
    return parts


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode a baseline JPEG to a uint8 array (H, W, 3) RGB, or (H, W) for grayscale."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file (no SOI marker)")
    qt, ht, comps, dri, i = {}, {}, [], 0, 2
    frame = None
    while i < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"corrupt JPEG: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        seg = data[i + 4:i + 2 + length]
        if marker == 0xDB:
            j = 0
            while j < len(seg):
                pq, tq = seg[j] >> 4, seg[j] & 15
                n = 128 if pq else 64
                vals = np.frombuffer(seg[j + 1:j + 1 + n], dtype=">u2" if pq else np.uint8).astype(np.int32)
                q = np.zeros(64, np.int32)
                q[_ZIGZAG] = vals
                qt[tq] = q.reshape(8, 8)
                j += 1 + n
        elif marker == 0xC4:
            j = 0
            while j < len(seg):
                tc, th = seg[j] >> 4, seg[j] & 15
                counts = list(seg[j + 1:j + 17])
                symbols = list(seg[j + 17:j + 17 + sum(counts)])
                ht[(tc, th)] = _huffman(counts, symbols)
                j += 17 + sum(counts)
        elif marker == 0xDD:
            dri = int.from_bytes(seg[:2], "big")
        elif marker in (0xC0, 0xC1):
            if seg[0] != 8:
                raise ValueError(f"only 8-bit JPEGs are supported, got {seg[0]}-bit")
            h, w = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            comps = [dict(id=seg[6 + 3 * k], hs=seg[7 + 3 * k] >> 4, vs=seg[7 + 3 * k] & 15, tq=seg[8 + 3 * k])
                     for k in range(seg[5])]
            frame = (h, w)
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            raise ValueError(f"unsupported JPEG coding (SOF marker 0x{marker:02X}: progressive/lossless/arithmetic);"
                             " only baseline JPEGs are supported")
        elif marker == 0xDA:
            if frame is None:
                raise ValueError("corrupt JPEG: scan before frame header")
            ns = seg[0]
            sel = {seg[1 + 2 * k]: (seg[2 + 2 * k] >> 4, seg[2 + 2 * k] & 15) for k in range(ns)}
            start = i + 2 + length
            end = data.find(b"\xff\xd9", start)
            return _decode_scan(data[start:end if end > 0 else len(data)], frame, comps, sel, qt, ht, dri)
        i += 2 + length
    raise ValueError("corrupt JPEG: no scan found")


def _decode_scan(entropy, frame, comps, sel, qt, ht, dri) -> np.ndarray:
    h, w = frame
    hmax, vmax = max(c["hs"] for c in comps), max(c["vs"] for c in comps)
    mcux, mcuy = -(-w // (8 * hmax)), -(-h // (8 * vmax))
    coefs = [np.zeros((mcuy * c["vs"], mcux * c["hs"], 64), np.int32) for c in comps]
    parts = _unstuff(entropy)
    part_i, br = 0, _Bits(parts[0])
    pred = [0] * len(comps)
    n_mcu = 0
    for my in range(mcuy):
        for mx in range(mcux):
            if dri and n_mcu and n_mcu % dri == 0:
                part_i += 1
                br = _Bits(parts[part_i] if part_i < len(parts) else b"")
                pred = [0] * len(comps)
            n_mcu += 1
            for ci, c in enumerate(comps):
                td, ta = sel[c["id"]]
                dct, act = ht[(0, td)], ht[(1, ta)]
                for by in range(c["vs"]):
                    for bx in range(c["hs"]):
                        blk = coefs[ci][my * c["vs"] + by, mx * c["hs"] + bx]
                        t = _decode_symbol(br, dct)
                        pred[ci] += _extend(br.bits(t), t)
                        blk[0] = pred[ci]
                        k = 1
                        while k < 64:
                            rs = _decode_symbol(br, act)
                            r, s = rs >> 4, rs & 15
                            if s == 0:
                                if r != 15:
                                    break
                                k += 16
                                continue
                            k += r
                            blk[k] = _extend(br.bits(s), s)
                            k += 1
    m = _idct_matrix()
    planes = []
    for ci, c in enumerate(comps):
        z = np.zeros_like(coefs[ci])
        z[..., _ZIGZAG] = coefs[ci]
        blocks = z.reshape(*z.shape[:2], 8, 8).astype(np.float64) * qt[c["tq"]]
        pix = np.einsum("ux,abuv,vy->abxy", m, blocks, m) + 128.0
        by, bx = pix.shape[:2]
        plane = pix.transpose(0, 2, 1, 3).reshape(by * 8, bx * 8)
        plane = np.repeat(np.repeat(plane, vmax // c["vs"], 0), hmax // c["hs"], 1)
        planes.append(plane[:h, :w])
    if len(planes) == 1:
        return np.clip(np.round(planes[0]), 0, 255).astype(np.uint8)
    y, cb, cr = planes[0], planes[1] - 128.0, planes[2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
