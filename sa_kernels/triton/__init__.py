"""Triton kernels behind the ``triton`` backend (``sa_kernels.backends.triton_kernels``).

* ``plane_math``: device helpers shared by the kernels (addressing, gate, statistics merge).
* ``forward``: the one-launch forward kernel.
* ``backward``: the per-plane backward kernel (dx and per-plane partial sums).
* ``param_grads``: the small kernel reducing those partial sums into the six parameter gradients.
* ``launch_config``: the launch heuristic (pure Python, importable without Triton).

Importing these modules (except ``launch_config``) imports Triton, so the
backend imports them lazily.
"""
