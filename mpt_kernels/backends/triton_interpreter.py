"""How the package runs under Triton's interpreter (``TRITON_INTERPRET``, CPU tensors).

``interpreter_enabled`` is Triton's own setting, read once when this module is imported
(when the package's kernels are defined, which is when Triton reads it too), so that the
package and Triton never disagree about a value such as ``TRITON_INTERPRET=yes`` (on for
Triton) or ``=2`` (off); a constant also keeps ``torch.compile`` from tracing Triton's
C++ environment lookup.

Importing this module also makes Triton 3.6's interpreter work with numpy 2.4. The
interpreter turns a scalar (held as an array of shape (1,)) into a Python int with
``int(array)``, which numpy 2.4 refuses, so every ``range`` over a runtime bound in a
kernel failed with "only 0-dimensional arrays can be converted to Python scalars".
Triton 3.7 converts ``int(array.squeeze())``; ``_squeeze_interpreted_indices`` makes 3.6
do the same, and does nothing on other versions or when the interpreter is off.
"""

from __future__ import annotations

import triton


_INTERPRETER = bool(triton.knobs.runtime.interpret)


def interpreter_enabled() -> bool:
    """Whether the package's kernels were defined for Triton's interpreter."""
    return _INTERPRETER


def _needs_squeezed_indices() -> bool:
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 7)


def _squeeze_interpreted_indices() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_indices", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_indices = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if _INTERPRETER and _needs_squeezed_indices():
    _squeeze_interpreted_indices()
