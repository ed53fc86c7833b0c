"""Triton kernels, one family per file, installed as ``encdec_fast.kernels``."""
