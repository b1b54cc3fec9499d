"""Triton kernels of scorefast (installed as ``scorefast.kernels``).

Private: the public ops live in ``scorefast.ops`` and reach these through
``scorefast.backends.triton_backend``.  One op per file: ``noise``, ``fused_update``,
``sumsq_norms``; ``philox`` mirrors ``csrc/include/scorefast/philox.h`` line for line.
"""
