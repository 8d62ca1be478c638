"""Sliding-window arithmetic shared by conv and pooling: padding rules and output sizes.

Padding in a spec is an int (all sides), [ph, pw], [top, left, bottom, right] (ONNX's order), or
"same" (TensorFlow's: total = max((out - 1) * stride + window - size, 0), the odd pixel at the end).
Rounding "floor" is every framework's default; "ceil" is Caffe's pooling and torch's ceil_mode: the
output grows by one where windows do not tile, and a last window that would start inside the end
padding is dropped (torch's rule; Caffe applies the drop only when pad > 0, which differs only for
a stride larger than the window with no padding).
"""

from __future__ import annotations

import math

from zoo.layers.base import pair


def pads(pad, window: tuple[int, int], stride: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) for a spec's `pad` on an input of `size` (H, W)."""
    if pad == "same":
        out = [-(-n // s) for n, s in zip(size, stride)]
        total = [max((o - 1) * s + k - n, 0) for o, s, k, n in zip(out, stride, window, size)]
        return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    if isinstance(pad, (list, tuple)) and len(pad) == 4 and all(isinstance(p, int) for p in pad):
        top, left, bottom, right = pad
    else:
        (top, left), (bottom, right) = pair(pad), pair(pad)
    if min(top, left, bottom, right) < 0:
        raise ValueError(f"negative padding {pad!r}")
    return (top, left, bottom, right)


def output_size(size: int, window: int, stride: int, before: int, after: int, rounding: str = "floor") -> int:
    span = size + before + after - window
    if span < 0:
        raise ValueError(f"window {window} larger than the padded input {size + before + after}")
    if rounding == "floor":
        return span // stride + 1
    if rounding != "ceil":
        raise ValueError(f"rounding must be floor or ceil, not {rounding!r}")
    out = math.ceil(span / stride) + 1
    return out - 1 if (out - 1) * stride >= size + before else out


def geometry(cfg: dict, window_key: str, size: tuple[int, int]):
    """(window, stride, (top, left, bottom, right) pads, (out_h, out_w), (extra_bottom, extra_right)):
    `extra` is the padding ceil rounding adds past the end so that every window is whole."""
    window = pair(cfg[window_key])
    stride = pair(cfg["stride"] if cfg.get("stride") is not None else cfg[window_key])
    top, left, bottom, right = pads(cfg.get("pad", 0), window, stride, size)
    rounding = cfg.get("rounding", "floor")
    out = (output_size(size[0], window[0], stride[0], top, bottom, rounding),
           output_size(size[1], window[1], stride[1], left, right, rounding))
    extra = tuple(max(0, (o - 1) * s + k - (n + b + a))
                  for o, s, k, n, b, a in zip(out, stride, window, size, (top, left), (bottom, right)))
    return window, stride, (top, left, bottom, right), out, extra
