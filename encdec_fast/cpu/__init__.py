"""The CPU's low-precision path: projection weights stored int8 or bf16 and multiplied with fp32 activations.

  kernels.py  the products (csrc/cpu_linear.cpp: AVX512-VNNI int8 x int16, AVX512-BF16), built on first use
  weights.py  the packed weights, their load-time conversion (WeightTransform) and the op table that reads them

load(quantize="int8") and load(dtype=torch.bfloat16) on the CPU choose them (model.py); the fp32 default stays on
oneDNN's fp32 layout (prepack.py), whose tokens equal transformers'.
"""
