"""A fix for Triton's CPU interpreter on the releases GPU images ship (Triton <= 3.6) under NumPy >= 2.4.

Why: the interpreter turns a kernel's scalar arguments into one-element NumPy arrays and gives ``tl.tensor`` an
``__index__`` of ``int(self.handle.data)``. NumPy 2.4 refuses ``int()`` of an array with a dimension ("only
0-dimensional arrays can be converted to Python scalars"), so every loop ``for j0 in range(0, L, BLOCK_N)`` with a
runtime ``L`` dies in the interpreter. Triton fixed this after 3.6 with ``int(self.handle.data.squeeze())``; this
module applies the same one-line fix to older interpreters, for the duration of each interpreted launch (Triton
restores its own patches afterwards, ours with them). Compiled GPU launches never reach this code.

Also a speed fix (:func:`vectorise_scans`): the interpreter runs a general ``tl.associative_scan`` one element at a
time, a Python call per entry, which made the fused attention's backward pass (a segmented scan over every score
tile) take over twenty minutes at 2048 tokens; a slice at a time gives the same numbers in about a minute.
"""

from __future__ import annotations

import functools


def _index(tensor) -> int:
    return int(tensor.handle.data.squeeze())


def apply() -> bool:
    """Install the fix when this Triton's interpreter needs it; True when installed (idempotent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no interpreter in this Triton build: nothing to fix
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_squeezes_index", False):
        return False

    @functools.wraps(original)
    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        result = original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", _index)  # undone with Triton's own patches, in reverse order
        return result

    patch_lang_tensor._squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def _slice_scan(self, input):
    """``ScanOps.generic_scan`` one slice at a time: the interpreter's own version calls the combine function once
    per *element* (a Python call per entry of a 64 x 64 tile), which made the fused attention's backward pass take
    minutes at 2048 tokens. A combine function is elementwise, so applying it to whole slices across the scan axis
    computes the same operations on the same operands in the same order along the axis: identical results."""
    import numpy as np
    from triton import language as tl

    axis = self.axis
    datas = [arg.handle.data for arg in input]
    outs = [np.empty(d.shape, dtype=d.dtype) for d in datas]

    def put(i, values):
        for out, value in zip(outs, values):
            data = value.handle.data if isinstance(value, tl.core.tensor) else value
            np.moveaxis(out, axis, 0)[i] = np.broadcast_to(data, np.moveaxis(out, axis, 0)[i].shape)

    def piece(i):
        return tuple(self.to_tensor(np.ascontiguousarray(np.take(d, [i], axis=axis)), arg.dtype)
                     for d, arg in zip(datas, input))

    acc = piece(0)
    put(0, [np.squeeze(t.handle.data, axis) for t in acc])
    for i in range(1, datas[0].shape[axis]):
        ret = self.combine_fn.fn(*acc, *piece(i))
        acc = ret if isinstance(ret, tuple) else (ret,)
        acc = tuple(a if isinstance(a, tl.core.tensor) else self.to_tensor(np.asarray(a), arg.dtype)
                    for a, arg in zip(acc, input))
        put(i, [np.squeeze(np.broadcast_to(a.handle.data, np.take(d, [i], axis=axis).shape), axis)
                for a, d in zip(acc, datas)])
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outs, input)]


def vectorise_scans() -> bool:
    """Make the interpreter's general ``tl.associative_scan`` work a slice at a time (see :func:`_slice_scan`);
    True when installed (idempotent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    scan_ops = getattr(interpreter, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan") or scan_ops.generic_scan is _slice_scan:
        return False
    scan_ops.generic_scan = _slice_scan
    return True
