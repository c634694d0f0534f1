"""The projection engine behind :class:`orthograd_fast.OrthoGrad` (``orthograd_fast/api.py``).

One step's data flows one way through these stages:

capture          op_capture (call_args), rules (one module per op family), batch_layout,
                 param_space, recurrent, fallback
  -> factors     factors, conv_factors: per-sample uses (A, D factors, conv inputs, rows)
  -> span        retain_span, span_blocks, unlearn_factors, forget_window
  -> terms       gram, route, routes, held_rows: Gram K and <g_i, u> per tensor, one class per route
  -> projection  projection, checks, solve, threads: float64 K^+ b, u - sum_i c_i g_i into .grad
  -> kernels     triton_ops (front end of orthograd_fast.kernels), ops_reference (plain torch)

``distributed`` gathers a span's factors across DDP ranks. Nothing here imports the facade
(``orthograd_fast.api``), ``orthograd_fast.unlearning`` or ``orthograd_fast.gram_schmidt`` (blocked
CGS2 stays outside the engine): tests/test_import_graph.py checks it.
"""
