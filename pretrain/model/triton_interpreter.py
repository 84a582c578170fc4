"""A fix for Triton's CPU interpreter on the releases GPU images ship (Triton <= 3.6) under NumPy >= 2.4.

Why: the interpreter turns a kernel's scalar arguments into one-element NumPy arrays and gives ``tl.tensor`` an
``__index__`` of ``int(self.handle.data)``. NumPy 2.4 refuses ``int()`` of an array with a dimension ("only
0-dimensional arrays can be converted to Python scalars"), so every loop ``for j0 in range(0, L, BLOCK_N)`` with a
runtime ``L`` dies in the interpreter. Triton fixed this after 3.6 with ``int(self.handle.data.squeeze())``; this
module applies the same one-line fix to older interpreters, for the duration of each interpreted launch (Triton
restores its own patches afterwards, ours with them). Compiled GPU launches never reach this code.
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
