"""Triton kernels of ipfm_fast (installed as ipfm_fast.kernels)."""
