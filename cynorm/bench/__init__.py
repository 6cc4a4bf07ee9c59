"""`python -m cynorm bench`: cynorm, PyTorch (CPU, when importable), a plain NumPy
reference and the optional anchors (ONNX Runtime, OpenVINO, JAX jit) side by side, in
one process, on the same arrays (DESIGN.md, "Performance method"), reported as ratios
and as GB/s against the copy bandwidth measured in the same run at the same thread
count.

One module per concern:
  suite      the cases and the arrays they run on
  impls      cynorm / torch / NumPy callables for one case
  anchors    the optional ONNX Runtime, OpenVINO and JAX columns (main suite and fused)
  reference  the plain NumPy forward and backward
  timing     the one timing helper and the thread-count context
  machine    CPU, cache, memory and copy-bandwidth facts
  measure    the measurement loop (suite cases, out-of-cache bandwidth cases)
  report     tables, summary, progress, JSON
  plot       the chart
  cli        options and the run
The self-check lives apart, in cynorm._selfcheck.
"""
