"""The ways of evaluating one tensor's K = G G^T, b = G u and update u - G^T c, one class each.

:class:`orthograd_fast.engine.gram.PerSampleGrads` picks the route for a tensor's uses and delegates
to it: explicit rows, per-sample tiles, token Grams (ghost), the Triton kernels of both, tokens
with one-hot sides, tables used by lookups only (pairs of rows two samples share), embedding
lookups in slabs of table rows, and grouped-convolution tiles.
"""
