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

And it makes the interpreter patch ``triton.language`` once per launch, not once per
device-function call as well. Every call of a ``@triton.jit`` helper repeated the
launch's patching (``inspect.getmembers`` over triton.language, its tensor and its math
module: about 1.4 ms), which found nothing left to patch inside a launch and was half of
the time of our CPU tests (a row kernel calls its helpers in every block of every row).
``_patch_language_once_per_launch`` skips that repetition where the helper sees no
language module the launch has not patched (Triton 3.6 to 3.9 alike).
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


def _patch_language_once_per_launch() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "once_per_launch", False):
        return
    patched = [frozenset()]  # the language modules the running launch has patched (ids)

    def languages(fn):  # the modules Triton's _patch_lang patches for fn
        return frozenset(id(value) for value in fn.__globals__.values() if value is tl or value is tl.core)

    def patch_lang(fn):
        wanted = languages(fn)
        if wanted <= patched[0]:  # a helper called within the launch: all patched already
            return interpreter._LangPatchScope()
        scope = original(fn)
        before = patched[0]
        patched[0] = before | wanted
        restore = scope.restore

        def restore_and_forget():  # the launch's end (a helper's scope is never restored)
            restore()
            patched[0] = before

        scope.restore = restore_and_forget
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang


if _INTERPRETER and _needs_squeezed_indices():
    _squeeze_interpreted_indices()
if _INTERPRETER:
    _patch_language_once_per_launch()
