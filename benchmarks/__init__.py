"""Benchmarks for orthograd-fast (importable as ``benchmarks`` from the repository root).

- ``benchmarks.zoo``: the model zoo (``build_model``, ``per_sample_loss``), shared by the CPU suite
  and the GPU script in ``benchmarks/gpu/``.
- ``benchmarks.oracle``: the float64 oracle (explicit per-sample loop + SVD projector), independent
  of the package.
- ``benchmarks.providers``: the timed implementations (plain, reference-qr/svd, opacus, torch, triton).
- ``benchmarks.memory``: honest peak-memory measurement (CUDA allocator stats / torch CPU allocator
  events from the profiler).
- ``benchmarks.report``: pytest-benchmark JSON -> markdown table + PNG plots.
- ``benchmarks.real_zoo``: models from libraries the project does not control (transformers
  models from small configs, ``nn.TransformerEncoder``, an LSTM), same API as ``zoo``.
- ``benchmarks.floor``: the FLOP floor of an exact OrthoGrad step over the plain step.
- ``benchmarks.real_zoo_run`` / ``benchmarks.real_report``: the real-model table (json, md, png).

See ``benchmarks/README.md``.
"""
