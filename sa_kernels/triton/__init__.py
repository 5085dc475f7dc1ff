"""Triton kernels behind the ``triton`` backend (``sa_kernels.backends.triton_kernels``).

* ``plane_math``: device helpers shared by the kernels (addressing, gate, statistics merge).
* ``forward``: the one-launch forward kernel.
* ``backward``: the per-plane backward kernel (dx and per-plane partial sums).
* ``param_grads``: the small kernel reducing those partial sums into the six parameter gradients.
* ``forward_split``, ``backward_split``: the two-launch kernels for split planes (channels_last
  with too few programs otherwise): per-slice partials, then a fixed-order merge per plane.
* ``launch_config``: the launch heuristic, its overrides and TUNED table (pure Python,
  importable without Triton).
* ``launcher``: ``KernelLaunch``, a launch with its plan's arguments fixed (pure Python).

Importing these modules (except ``launch_config`` and ``launcher``) imports Triton, so the
backend imports them lazily.
"""
