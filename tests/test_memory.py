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



def test_legacy_bin_state_dict_lets_go_of_each_tensor_after_its_last_read(make_ckpt, monkeypatch):
    """A legacy pre-zip .bin is read whole; WeightReader.expect tells it how often load() reads each tensor,
    and the state dict drops a tensor after its last read (so a copied, fused or packed weight is not held
    twice until the end of the load). After the load it holds only what the model never reads."""
    import torch

    from encdec_fast import checkpoint as ckpt
    from encdec_fast import prepack
    from encdec_fast.checkpoint import sources

    readers = []

    class Recorded(ckpt.WeightReader):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            readers.append(self)

    monkeypatch.setattr(sources, "WeightReader", Recorded)
    path = pathlib.Path(make_ckpt("bert", "gpt2", fmt="legacy_bin"))
    src = ckpt.open_folder(path)
    [reader] = readers
    everything = set(reader.keys())
    net = ckpt.build_net(src, device="cpu", dtype=torch.float32, seed=0, transform=prepack.TRANSFORM)
    [state] = reader._open.values()
    assert isinstance(state, dict) and set(state) == everything - set(sources._reads(src.plan)) == {
        "encoder.pooler.dense.weight", "encoder.pooler.dense.bias"}
    assert net.decoder.layers[0].attn.qkv.weight.is_mkldnn
