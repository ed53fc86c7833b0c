"""Compile recorded Triton launches ahead of time for a GPU this machine does not have.

    python tests/kernel_compile.py SPECS.json [--arch 90]

SPECS.json: a list of {"module", "kernel", "signature", "constexprs", "options"} (test_kernels_compile.py
records them from the launches the interpreter runs). Each is compiled by Triton's own compiler for
CUDA sm_<arch> (90: H100 and H200), down to a cubin through ptxas, without a GPU or a CUDA driver; prints
one JSON list: {"kernel", "ok", "shared" (bytes of shared memory), "error"} per spec.

Run without TRITON_INTERPRET: the interpreter replaces @triton.jit functions with Python ones.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_compile.py: unset TRITON_INTERPRET (the interpreter cannot compile)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    specs = json.load(open(sys.argv[1]))
    arch = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
    target = GPUTarget("cuda", arch, 32)
    out = []
    for s in specs:
        fn = getattr(importlib.import_module(s["module"]), s["kernel"])
        row = {"kernel": s["kernel"], "ok": False, "shared": None, "error": None}
        try:
            src = ASTSource(fn=fn, signature=s["signature"], constexprs=s["constexprs"])
            k = triton.compile(src, target=target, options=s["options"])
            row.update(ok="cubin" in k.asm, shared=k.metadata.shared)
        except Exception as e:  # noqa: BLE001  reported per spec
            row["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
        out.append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
