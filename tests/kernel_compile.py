"""Compile recorded Triton launches ahead of time for a GPU this machine does not have.

    python tests/kernel_compile.py SPECS.json [--arch 90]

SPECS.json: a list of {"module", "kernel", "signature", "constexprs", "options", "div16"} (test_kernels_compile.py
records them from the launches the interpreter runs; div16: the arguments divisible by 16, as Triton's
launcher marks them on a GPU). Each is compiled by Triton's own compiler for
CUDA sm_<arch> (90: H100 and H200), down to a cubin through ptxas, without a GPU or a CUDA driver; prints
one JSON list: {"kernel", "ok", "shared" (bytes of shared memory), "registers", "spill_stores" (bytes a
thread spills to local memory, from ptxas's report; None when Triton's cache skipped ptxas: run with a
fresh TRITON_CACHE_DIR), "error"} per spec.

Run without TRITON_INTERPRET: the interpreter replaces @triton.jit functions with Python ones.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import sys


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_compile.py: unset TRITON_INTERPRET (the interpreter cannot compile)")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report (registers, spills)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if hasattr(getattr(triton, "knobs", None), "nvidia"):
        triton.knobs.nvidia.dump_ptxas_log = True
    specs = json.load(open(sys.argv[1]))
    arch = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
    target = GPUTarget("cuda", arch, 32)
    out = []
    for s in specs:
        fn = getattr(importlib.import_module(s["module"]), s["kernel"])
        row = {"kernel": s["kernel"], "ok": False, "shared": None, "registers": None, "spill_stores": None,
               "error": None}
        try:
            attrs = {(i,): [["tt.divisibility", 16]] for i in s.get("div16", [])}
            src = ASTSource(fn=fn, signature=s["signature"], constexprs=s["constexprs"], attrs=attrs)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                k = triton.compile(src, target=target, options=s["options"])
            regs = re.search(r"Used (\d+) registers", log.getvalue())
            spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
            row.update(ok="cubin" in k.asm, shared=k.metadata.shared, registers=int(regs.group(1)) if regs else None,
                       spill_stores=int(spills.group(1)) if spills else None)
        except Exception as e:  # noqa: BLE001  reported per spec
            row["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
        out.append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
