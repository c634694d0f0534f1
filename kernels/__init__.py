"""Triton kernels of orthograd-fast, installed as ``orthograd_fast.kernels``.

Imported lazily by the engine: nothing here is imported unless a Triton backend is asked for,
so the package works without triton installed. Import these modules only as
``orthograd_fast.kernels.<name>``.

| module | kernel -> launcher | torch-facing function (orthograd_fast.engine.triton_ops) |
|---|---|---|
| tile_gram  | _tile_gram_kernel -> tile_gram   | tile_gram(A, D, U=None, *, deterministic=True) |
| ghost_gram | _ghost_gram_kernel -> ghost_gram | ghost_gram(A, D, U=None) (b through coef) |
| coef       | _coef_kernel -> coef             | coef(A, D, U) |
| cgs_step   | _cgs_step_kernel -> cgs_step     | none: orthograd_fast.gram_schmidt cgs2 / project_out, backend="triton" |

Launchers trust their inputs (triton_ops validates; gram_schmidt for cgs_step) and take block-size
keywords, which the tests use to force many small tiles. Whether a kernel runs compiled or in the
Triton interpreter is fixed when its module is imported (TRITON_INTERPRET at that moment): see
``_common.is_interpreted``.

The source folder is the top-level ``kernels/`` of a checkout. Where the checkout's root is on
``sys.path`` (``python -m ...`` or ``python -c`` run there), a plain ``import kernels`` would find
this folder before an installed distribution of that name (Hugging Face's ``kernels``, which
transformers imports). Imported under that top-level name, this file therefore steps aside: it
loads the installed ``kernels`` from the rest of ``sys.path`` in its place, or raises
ModuleNotFoundError when none is installed (see ``_handover``).
"""

if __name__ == "kernels":  # a checkout's root on sys.path, not the installed orthograd_fast.kernels

    def _handover():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def _elsewhere(entry):
            try:
                return os.path.abspath(entry or os.getcwd()) != here
            except (TypeError, ValueError):  # a non-path entry (path hooks): keep it
                return True

        del sys.modules[__name__]
        spec = importlib.machinery.PathFinder.find_spec(__name__, [p for p in sys.path if _elsewhere(p)])
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                "No module named 'kernels' (the folder kernels/ of an orthograd-fast checkout is "
                "importable only as orthograd_fast.kernels)",
                name="kernels",
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(__name__, None)
            raise

    _handover()
    del _handover
