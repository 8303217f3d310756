"""Triton kernels of sbpet, installed as the subpackage sbpet.kernels."""
