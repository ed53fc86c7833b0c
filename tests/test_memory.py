"""load() reads tensors lazily into meta-built modules: peak memory stays about one model copy."""

import importlib.util
import pathlib


def test_load_peak_memory_under_1_5x_weights():
    spec = importlib.util.spec_from_file_location(
        "load_memory", pathlib.Path(__file__).parent.parent / "benchmarks" / "load_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run("medium")  # fresh processes: build with transformers, then load with encdec_fast
    assert r["model_bytes"] >= 0.8 * r["weight_bytes"], r  # everything really was loaded (a tied lm_head copy is skipped)
    assert r["ratio"] < 1.5, f"peak RSS increase {r['peak_increase']} B = {r['ratio']:.2f}x weights {r['weight_bytes']} B"
