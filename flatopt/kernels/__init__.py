"""Kernels by backend: ``cpu`` (Numba ``@njit``) and ``cuda`` (Numba CUDA)."""
