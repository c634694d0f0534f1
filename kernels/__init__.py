"""Triton kernels of orthograd-fast, installed as ``orthograd_fast.kernels``.

Imported lazily by the engine: nothing here is imported unless a Triton backend is asked for,
so the package works without triton installed.
"""
