"""The CPU path's own kernels: projection weights stored int8, bf16 or fp32, packed once at load, multiplied with
fp32 activations, and the decode attention.

  kernels.py  the products (csrc/cpu_linear.cpp: AVX512-VNNI int8 x int16, AVX512-BF16, fp32 FMA) and the decode
              attention, built by the C++ compiler on first use
  weights.py  the packed weights, their load-time conversion (WeightTransform) and the op table that reads them

quantize.py picks them: load() in fp32 (the default; tokens equal transformers'), in bf16 and with quantize="int8" on
the CPU. Where they cannot run (no AVX-512, no compiler) fp32 and bf16 fall back to oneDNN's layouts (prepack.py).
"""
