from setuptools import setup

SERVE = ["fastapi>=0.100", "uvicorn>=0.29", "prometheus-client>=0.17"]  # encdec-fast serve
RAY = ["ray[data,serve]>=2.40"]  # encdec_fast.ray: Ray Data batch generation, Ray Serve replicas

setup(
    name="encdec_fast",
    version="0.1.0",
    description="Fast inference runtime for Hugging Face EncoderDecoderModel checkpoints (BERT-family encoders -> GPT-2, BERT-family or BART decoders)",
    python_requires=">=3.10",
    # csrc/ ships as package data (encdec_fast._csrc) so that an installed copy can build its CUDA kernels
    # with nvcc on first use (encdec_fast/csrc.py); a libencdec_cuda.so placed there is used as is; and its CPU
    # kernels (cpu_linear.cpp) with the C++ compiler (encdec_fast/cpu_kernels.py)
    # kernels/ has no __init__.py on purpose: run from the repository root, a regular package named `kernels`
    # would shadow Hugging Face's `kernels`, which transformers imports with every model. encdec_fast/kernels is a
    # symbolic link to it, so that encdec_fast.kernels (the only name the project imports it by) resolves in a
    # checkout, an editable install and a wheel alike (setuptools' editable finder cannot map a namespace
    # subpackage of a regular package onto another folder).
    packages=["encdec_fast", "encdec_fast.checkpoint", "encdec_fast.cpu", "encdec_fast.decode", "encdec_fast.engine", "encdec_fast.kernels", "encdec_fast._csrc"],
    package_dir={"encdec_fast": "encdec_fast", "encdec_fast._csrc": "csrc"},
    package_data={"encdec_fast._csrc": ["*.cu", "*.h", "*.cpp", "libencdec_cuda.so"]},
    # sentencepiece: transformers needs it to load BertGenerationTokenizer (spiece.model), the tokenizer of the
    # bert-generation checkpoints of Rothe et al.; it has no tokenizers-library counterpart
    install_requires=["torch>=2.4", "triton>=3.0", "transformers>=5.0", "safetensors>=0.4", "sentencepiece>=0.2"],
    extras_require={
        "serve": SERVE,
        "ray": RAY,
        "test": ["pytest>=8", "pytest-benchmark>=4", "httpx>=0.25"] + SERVE + RAY,
    },
    entry_points={"console_scripts": ["encdec-fast=encdec_fast.cli:main"]},
)
