"""The package layout, which pyproject.toml's metadata cannot express: kernels/ and csrc/ are installed inside
encdec_fast (pyproject.toml holds the metadata, dependencies and extras)."""

from setuptools import setup

setup(
    # csrc/ ships as package data (encdec_fast._csrc) so that an installed copy can build its kernels on first
    # use: the CUDA ones with nvcc (encdec_fast/csrc.py; a libencdec_cuda.so placed there is used as is), the
    # CPU ones (cpu_linear.cpp) with the C++ compiler (encdec_fast/cpu/kernels.py)
    # kernels/ has no __init__.py on purpose: run from the repository root, a regular package named `kernels`
    # would shadow Hugging Face's `kernels`, which transformers imports with every model. encdec_fast/kernels is a
    # symbolic link to it, so that encdec_fast.kernels (the only name the project imports it by) resolves in a
    # checkout, an editable install and a wheel alike (setuptools' editable finder cannot map a namespace
    # subpackage of a regular package onto another folder).
    packages=["encdec_fast", "encdec_fast.checkpoint", "encdec_fast.cpu", "encdec_fast.decode", "encdec_fast.engine",
              "encdec_fast.kernels", "encdec_fast._csrc"],
    package_dir={"encdec_fast": "encdec_fast", "encdec_fast._csrc": "csrc"},
    package_data={"encdec_fast._csrc": ["*.cu", "*.h", "*.cpp", "libencdec_cuda.so"]},
)
