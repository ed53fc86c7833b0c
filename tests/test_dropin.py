"""A new user's script, side by side with transformers: load by folder or Hub id (from a Hugging Face cache
built here: nothing is downloaded), tokenizer -> generate -> decode, GenerationConfig, transition scores,
encoder_outputs from get_encoder(), in-place edits of the logits, return_dict=False, dtype moves,
parameters and num_parameters, eval/train. Every Hub test runs with HF_HUB_OFFLINE=1 and its cache in
tmp_path; the one online path is driven through fakes of huggingface_hub's functions."""

import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_checkpoint, half_config, hf_model
from transformers import GenerationConfig

import encdec_fast
from encdec_fast import (
    CheckpointNotFoundError,
    InvalidInputError,
    UnsupportedArgumentError,
)
from encdec_fast.checkpoint import hub

pytestmark = pytest.mark.usefixtures("quiet")

V = 97
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]
TEXTS = ["w1 w2 w3 w4 w5", "w40 w41 w7", "w5 w6 w7 w8 w9 w10 w11 w12"]
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def with_tokenizer(src, dst):
    """A copy of checkpoint folder src with a BertTokenizer over WORDS saved beside the weights."""
    import transformers as T

    shutil.copytree(src, dst)
    T.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(dst)
    return Path(dst)


@pytest.fixture(scope="module")
def ckpt(make_ckpt, tmp_path_factory):
    return with_tokenizer(make_ckpt("bert", "gpt2"), tmp_path_factory.mktemp("b2g") / "ckpt")


@pytest.fixture(scope="module")
def pair(ckpt):
    """(ours, transformers') for the bert2gpt2 checkpoint with a tokenizer, and the tokenizer."""
    from transformers import AutoTokenizer

    return encdec_fast.load(ckpt, device="cpu"), hf_model(ckpt), AutoTokenizer.from_pretrained(str(ckpt))


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",), skip=()):
    """folder's files as the Hugging Face cache holds a snapshot: blobs/<hash>, snapshots/<commit>/<name> a
    relative symbolic link to its blob, refs/<branch> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(Path(folder).iterdir()):
        if f.name in skip:
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, found through HF_HUB_CACHE, with downloads off."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(5, V, (2, 6), generator=g), torch.randint(5, V, (2, 4), generator=g)
    return model(ids, decoder_input_ids=dec).logits


# ------------------------------------------------------------------------------------------------
# tokenizer -> generate -> decode, as transformers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=8),
    dict(max_new_tokens=8, num_beams=3),
    dict(max_new_tokens=8, do_sample=True, top_k=20, seed=3),
    dict(generation_config=GenerationConfig(max_new_tokens=6, num_beams=2, no_repeat_ngram_size=2,
                                            decoder_start_token_id=3, eos_token_id=2, pad_token_id=0)),
], ids=["greedy", "beams", "sampling", "GenerationConfig"])
def test_tokenizer_batch_generate_decode_matches_transformers(pair, kw):
    ours, ref, tok = pair
    kw = dict(kw)
    seed = kw.pop("seed", None)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    outs = []
    for model in (ours, ref):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(**batch, **kw))
    assert torch.equal(outs[0], outs[1])
    assert tok.batch_decode(outs[0], skip_special_tokens=True) == tok.batch_decode(outs[1], skip_special_tokens=True)


@pytest.mark.parametrize("enc,dec", [("bert", "bert"), ("roberta", "roberta")])
def test_generate_with_labels_loss_matches_transformers_for_other_families(make_ckpt, enc, dec):
    path = make_ckpt(enc, dec)
    ours, ref = encdec_fast.load(path, device="cpu"), hf_model(path)
    ids = torch.randint(5, V, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, num_beams=2)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    labels = ids[:, :5].clone()
    labels[1, 3:] = -100
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels).loss
    assert abs(ours(ids, labels=labels).loss.item() - want.item()) < 1e-4 * abs(want.item())


# ------------------------------------------------------------------------------------------------
# Hub ids
# ------------------------------------------------------------------------------------------------
def test_hub_id_offline_loads_the_cached_snapshot_and_its_tokenizer(ckpt, offline_cache):
    snap = add_to_cache(offline_cache, "org/tiny", ckpt, COMMIT_A)
    model = encdec_fast.load("org/tiny", device="cpu")
    assert model.path == snap
    assert torch.equal(logits(model), logits(encdec_fast.load(ckpt, device="cpu")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    with encdec_fast.Engine(model) as engine:
        res = engine.generate(TEXTS[:2], max_new_tokens=5)
    for text, r in zip(TEXTS, res):
        assert r.input_ids == tok(text)["input_ids"] and isinstance(r.text, str)


def test_hub_revision_by_branch_and_by_commit_hash(ckpt, make_ckpt, tmp_path, offline_cache, monkeypatch):
    other = build_checkpoint(tmp_path / "other", "bert", "gpt2", seed=5)
    add_to_cache(offline_cache, "org/tiny", ckpt, COMMIT_A, refs=("main",))
    add_to_cache(offline_cache, "org/tiny", Path(other), COMMIT_B, refs=("dev",))
    want_a = logits(encdec_fast.load(ckpt, device="cpu"))
    want_b = logits(encdec_fast.load(other, device="cpu"))
    assert torch.equal(logits(encdec_fast.load("org/tiny", device="cpu")), want_a)
    assert torch.equal(logits(encdec_fast.load("org/tiny", revision="dev", device="cpu")), want_b)
    assert torch.equal(logits(encdec_fast.load("org/tiny", revision=COMMIT_B, device="cpu")), want_b)
    with pytest.raises(CheckpointNotFoundError, match="revision 'v9'"):
        encdec_fast.load("org/tiny", revision="v9")
    # cache_dir= and local_files_only=True instead of the environment
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    model = encdec_fast.load("org/tiny", cache_dir=offline_cache, local_files_only=True, device="cpu")
    assert torch.equal(logits(model), want_a)


def test_hub_id_missing_offline_is_a_clear_error(ckpt, offline_cache):
    with pytest.raises(CheckpointNotFoundError, match=r"'org/absent'.*not in the Hugging Face cache.*"
                       r"hf download org/absent") as e:
        encdec_fast.load("org/absent")
    assert "HF_HUB_OFFLINE" in str(e.value)
    # a snapshot without its weights: the missing file is named
    add_to_cache(offline_cache, "org/partial", ckpt, COMMIT_A, skip=("model.safetensors",))
    with pytest.raises(CheckpointNotFoundError, match="lacks .*the weights"):
        encdec_fast.load("org/partial")
    # path syntax is never a Hub id: the folder error, as before
    for p in ("./org/absent", str(offline_cache / "nope"), Path("org/absent")):
        with pytest.raises(CheckpointNotFoundError, match="does not exist"):
            encdec_fast.load(p)


def test_hub_sharded_snapshot_needs_every_shard(make_ckpt, offline_cache):
    path = make_ckpt("bert", "gpt2", fmt="sharded")
    shards = sorted(f.name for f in Path(path).glob("model-*.safetensors"))
    add_to_cache(offline_cache, "org/sharded", path, COMMIT_A)
    want = logits(encdec_fast.load(path, device="cpu"))
    assert torch.equal(logits(encdec_fast.load("org/sharded", device="cpu")), want)
    add_to_cache(offline_cache, "org/torn", path, COMMIT_B, skip=(shards[-1],))
    with pytest.raises(CheckpointNotFoundError, match=shards[-1]):
        encdec_fast.load("org/torn")


def _standalone_halves(tmp_path):
    import transformers as T

    torch.manual_seed(2)
    enc = T.BertModel(half_config("bert", hidden=32, layers=2, heads=2, vocab=V, decoder=False))
    dec = T.GPT2LMHeadModel(half_config("gpt2", hidden=32, layers=2, heads=2, vocab=V, decoder=True))
    enc.save_pretrained(tmp_path / "enc")
    dec.save_pretrained(tmp_path / "dec")
    return tmp_path / "enc", tmp_path / "dec"


def test_glued_encoder_and_decoder_hub_ids(tmp_path, offline_cache):
    ep, dp = _standalone_halves(tmp_path)
    add_to_cache(offline_cache, "org/enc", ep, COMMIT_A)
    add_to_cache(offline_cache, "org/dec", dp, COMMIT_B)
    by_id = encdec_fast.load(encoder="org/enc", decoder="org/dec", device="cpu")
    by_folder = encdec_fast.load(encoder=ep, decoder=dp, device="cpu")
    assert torch.equal(logits(by_id), logits(by_folder))
    with pytest.raises(CheckpointNotFoundError, match="'org/nodec'"):
        encdec_fast.load(encoder="org/enc", decoder="org/nodec")


def test_cli_generate_takes_a_hub_id(ckpt, offline_cache, tmp_path):
    import json

    from encdec_fast.cli import main

    add_to_cache(offline_cache, "org/tiny", ckpt, COMMIT_A)
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("\n".join(TEXTS[:2]) + "\n")
    assert main(["generate", "org/tiny", "--input", str(inp), "--output", str(out), "--max-new-tokens", "4",
                 "--quiet", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(isinstance(r["text"], str) for r in rows)


class _FakeHub:
    """huggingface_hub's model_info, hf_hub_download and snapshot_download over a folder standing for the
    remote repository: records what is asked for, copies it into a snapshot folder."""

    def __init__(self, remote: Path, local: Path, missing=False):
        self.remote, self.local, self.missing = remote, local, missing
        self.patterns, self.single = None, []

    def api(self, token=None):
        hub_ = self

        class Api:
            def model_info(self, repo_id, revision=None, token=None):
                if hub_.missing:
                    from huggingface_hub.errors import RepositoryNotFoundError

                    e = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
                    Exception.__init__(e, "404 Client Error: Repository Not Found")
                    raise e
                return SimpleNamespace(sha=COMMIT_A, siblings=[SimpleNamespace(rfilename=f.name)
                                                               for f in hub_.remote.iterdir()])

        return Api()

    def hf_hub_download(self, repo_id, filename, revision=None, cache_dir=None, token=None):
        self.single.append(filename)
        self.local.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.remote / filename, self.local / filename)
        return str(self.local / filename)

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, token=None, allow_patterns=None):
        self.patterns = sorted(allow_patterns)
        self.local.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            shutil.copy(self.remote / name, self.local / name)
        return str(self.local)


@pytest.mark.parametrize("fmt", ["both", "sharded"])
def test_online_download_asks_only_for_the_files_a_load_reads(ckpt, make_ckpt, tmp_path, monkeypatch, fmt):
    import huggingface_hub
    from huggingface_hub import constants

    remote = tmp_path / "remote"
    if fmt == "both":  # safetensors and a .bin: the safetensors alone
        shutil.copytree(ckpt, remote)
        torch.save({"x": torch.zeros(1)}, remote / "pytorch_model.bin")
        (remote / "README.md").write_text("card")
    else:
        shutil.copytree(make_ckpt("bert", "gpt2", fmt="sharded"), remote)
    fake = _FakeHub(remote, tmp_path / "cache" / "snap")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    model = encdec_fast.load("org/remote", cache_dir=tmp_path / "cache", device="cpu")
    assert model.path == tmp_path / "cache" / "snap"
    if fmt == "both":
        tokenizer = [f for f in hub.TOKENIZER if (remote / f).exists()]
        assert tokenizer and fake.patterns == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                      *tokenizer])
    else:
        shards = sorted(f.name for f in remote.glob("model-*.safetensors"))
        assert fake.single == ["model.safetensors.index.json"]
        assert fake.patterns == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                                        *shards])
    fake.missing = True
    with pytest.raises(CheckpointNotFoundError, match="no model 'org/gone'"):
        encdec_fast.load("org/gone", cache_dir=tmp_path / "cache2")


def test_hub_arguments_are_checked(ckpt):
    with pytest.raises(InvalidInputError, match="revision"):
        encdec_fast.load(ckpt, revision=3)
    with pytest.raises(InvalidInputError, match="local_files_only"):
        encdec_fast.load(ckpt, local_files_only="yes")
    with pytest.raises(UnsupportedArgumentError, match=r"\['device_map'\]"):
        encdec_fast.load(ckpt, device_map="auto")
    # a local folder ignores the Hub arguments, as transformers does
    assert encdec_fast.load(ckpt, revision="main", device="cpu").path == ckpt


# ------------------------------------------------------------------------------------------------
# the model surface
# ------------------------------------------------------------------------------------------------
def test_model_surface_scripts_and_pipelines_touch(pair):
    ours, ref, _ = pair
    assert isinstance(ours, torch.nn.Module)
    assert ours.can_generate() and type(ours).can_generate() and ours.main_input_name == ref.main_input_name
    assert ours.config.is_encoder_decoder is True
    assert ours.generation_config.decoder_start_token_id == ref.generation_config.decoder_start_token_id
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert ours.get_encoder().config.model_type == "bert" and ours.get_decoder().config.model_type == "gpt2"
    assert ours.encoder.config is ours.config.encoder


def test_eval_returns_the_model_and_train_refuses(pair):
    ours = pair[0]
    assert ours.eval() is ours and ours.train(False) is ours and ours.training is False
    assert not any(m.training for m in ours.modules())
    for call in (ours.train, lambda: ours.train(True), lambda: ours.requires_grad_(True)):
        with pytest.raises(UnsupportedArgumentError, match="inference only.*from_transformers"):
            call()
    assert ours.requires_grad_(False) is ours
    with pytest.raises(UnsupportedArgumentError, match="named_parameters"):
        ours.state_dict()
    with pytest.raises(UnsupportedArgumentError, match=r"model.to\(device, dtype\)"):
        ours.share_memory()


@pytest.mark.parametrize("enc,dec,kw", [
    ("bert", "gpt2", {}),
    ("bert", "gpt2", dict(dec_kw=dict(tie_word_embeddings=False))),
    ("bert", "gpt2", dict(dec_hidden=48)),
    ("bert", "bert", {}),
    ("roberta", "roberta", {}),
    ("electra", "bert", {}),
    ("bert", "bart", {}),
], ids=["bert2gpt2", "untied-head", "enc_to_dec_proj", "bert2bert", "roberta2roberta", "electra2bert", "bert2bart"])
@pytest.mark.parametrize("prepack", [True, False], ids=["packed", "plain"])
def test_num_parameters_equals_transformers(make_ckpt, enc, dec, kw, prepack):
    path = make_ckpt(enc, dec, **kw)
    ours, ref = encdec_fast.load(path, device="cpu", prepack=prepack), hf_model(path)
    assert ours.num_parameters() == ref.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
    assert ours.num_parameters(only_trainable=True) == 0
    pooler = sum(p.numel() for n, p in ref.named_parameters() if ".pooler." in n)
    assert sum(p.numel() for p in ours.parameters()) == ref.num_parameters() - pooler
    names = [n for n, _ in ours.named_parameters()]
    assert len(names) == len(set(names)) and all(n.startswith("net.") for n in names)
    assert next(ours.parameters()).dtype == torch.float32 and not any(p.requires_grad for p in ours.parameters())
    ours.half()  # storage changes (unpacked, cast), the count does not
    assert ours.num_parameters() == ref.num_parameters()


def test_num_parameters_of_a_tie_encoder_decoder_checkpoint(tmp_path):
    """A bert2bert saved with tie_encoder_decoder=True (transformers 4.x) stores the shared body once;
    transformers 5 loads it into untied parameters, and counts them all, as we do."""
    import json

    from safetensors.torch import load_file, save_file

    path = build_checkpoint(tmp_path / "tied", "bert", "bert")
    sd = load_file(str(path / "model.safetensors"))
    for k in [k for k in sd if k.startswith("decoder.bert.") and "encoder." + k[len("decoder.bert."):] in sd]:
        del sd[k]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_encoder_decoder"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    ref = hf_model(path)
    for prepack in (True, False):
        ours = encdec_fast.load(path, device="cpu", prepack=prepack)
        assert ours.cfg.tie_encoder_decoder and ours.num_parameters() == ref.num_parameters()
        ours.to(torch.bfloat16)
        assert ours.num_parameters() == ref.num_parameters()


def test_dtype_moves_as_torch_parses_them(make_ckpt):
    path = make_ckpt("bert", "gpt2")
    ours = encdec_fast.load(path, device="cpu")
    want = logits(ours)
    packed = ours.ops.name
    cpu = torch.device("cpu")
    for move, dtype in [(lambda m: m.half(), torch.float16), (lambda m: m.to(torch.float32), torch.float32),
                        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16), (lambda m: m.float(), torch.float32),
                        (lambda m: m.to(device=cpu, dtype=torch.float16), torch.float16),
                        (lambda m: m.to(torch.zeros(1, dtype=torch.bfloat16)), torch.bfloat16),
                        (lambda m: m.to(dtype="fp16"), torch.float16), (lambda m: m.cpu(), torch.float16),
                        (lambda m: m.bfloat16(), torch.bfloat16), (lambda m: m.to(cpu).float(), torch.float32)]:
        assert move(ours) is ours and ours.dtype == dtype
        assert ours.ops.name == (packed if dtype != torch.float16 else "torch")  # packed CPU weights in fp32 and bf16
        got = logits(ours)  # the CPU's bf16 kernels compute fp32 logits
        assert got.dtype in (dtype, torch.float32) and rel_err(got.float(), want) < 5e-2
    assert rel_err(logits(ours), want) < 1e-2  # back in fp32 (weights rounded through 16 bits on the way)
    for bad, err, match in [((torch.float64,), UnsupportedArgumentError, "float64"),
                            (("gpu",), InvalidInputError, "cannot read its arguments"),
                            ((torch.zeros(1, dtype=torch.long),), UnsupportedArgumentError, "int64")]:
        with pytest.raises(err, match=match):
            ours.to(*bad)
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedArgumentError, match="no CUDA"):
            ours.cuda()


def test_load_takes_torch_dtype_and_auto(make_ckpt):
    path = make_ckpt("bert", "gpt2")
    assert encdec_fast.load(path, device="cpu", torch_dtype=torch.float16).dtype == torch.float16
    assert encdec_fast.load(path, device="cpu", dtype="auto").dtype == torch.float32  # as stored
    assert encdec_fast.load(path, device="cpu", torch_dtype="bfloat16", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(InvalidInputError, match="disagree"):
        encdec_fast.load(path, dtype=torch.float16, torch_dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# forward: ordinary tensors, transformers' tuple, encoder outputs
# ------------------------------------------------------------------------------------------------
def test_outputs_are_ordinary_tensors_editable_and_usable_in_autograd(pair):
    ours = pair[0]
    ids, dec = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[3, 9, 10]])
    out = ours(ids, decoder_input_ids=dec)
    assert not out.logits.is_inference() and not out.encoder_last_hidden_state.is_inference()
    out.logits[..., 0] = -float("inf")  # transformers' idiom: ban a token
    assert torch.isinf(out.logits[..., 0]).all()
    w = torch.ones(V, requires_grad=True)
    (out.logits[..., 1:] * w[1:]).sum().backward()
    assert w.grad is not None
    hidden, _ = ours.encode(ids)
    hidden += 1
    packed, _ = ours.encode_packed(ids)
    packed.mul_(2)
    seq = ours.generate(ids, max_new_tokens=3)
    seq[0, -1] = 0


@pytest.mark.parametrize("with_labels", [False, True])
def test_return_dict_false_is_transformers_tuple(pair, with_labels):
    ours, ref, _ = pair
    ids, dec = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), torch.tensor([[3, 9, 10], [3, 4, 5]])
    kw = dict(labels=dec) if with_labels else dict(decoder_input_ids=dec)
    with torch.no_grad():
        want = ref(input_ids=ids, return_dict=False, use_cache=False, **kw)
    got = ours(ids, return_dict=False, use_cache=True, **kw)
    assert isinstance(got, tuple) and len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) < 1e-4


def test_encoder_outputs_from_get_encoder_as_in_transformers(pair):
    ours, ref, tok = pair
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    dec = torch.tensor([[3, 9, 10]] * len(TEXTS))
    mask = batch["attention_mask"]
    with torch.no_grad():
        want = ref(encoder_outputs=ref.get_encoder()(**batch), attention_mask=mask, decoder_input_ids=dec).logits
        dec_want = ref.get_decoder()(input_ids=dec, encoder_hidden_states=ref.get_encoder()(**batch).last_hidden_state,
                                     encoder_attention_mask=mask, labels=dec)
    enc = ours.get_encoder()(**batch)
    assert enc.last_hidden_state.shape == (len(TEXTS), mask.shape[1], 32)
    got = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec).logits
    assert rel_err(got, want) < 1e-4 and torch.equal(got, ours(**batch, decoder_input_ids=dec).logits)
    d = ours.get_decoder()(input_ids=dec, encoder_hidden_states=enc.last_hidden_state, encoder_attention_mask=mask,
                           labels=dec)
    assert rel_err(d.logits, dec_want.logits) < 1e-4 and abs(d.loss.item() - dec_want.loss.item()) < 1e-4
    assert isinstance(ours.get_encoder()(**batch, return_dict=False), tuple)
    with torch.no_grad():  # transformers' idiom: generate() from the encoder's output
        gen_want = ref.generate(encoder_outputs=ref.get_encoder()(**batch), attention_mask=mask, max_new_tokens=5)
    assert torch.equal(ours.generate(encoder_outputs=enc, attention_mask=mask, max_new_tokens=5), gen_want)
    with pytest.raises(InvalidInputError, match="encoder_hidden_states"):
        ours.get_decoder()(input_ids=dec)


def test_forward_takes_transformers_arguments_it_does_not_need(pair):
    ours = pair[0]
    ids, dec = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[3, 9, 10]])
    want = ours(ids, decoder_input_ids=dec).logits
    got = ours(ids, decoder_input_ids=dec, use_cache=True, past_key_values=None, cache=None, inputs_embeds=None,
               decoder_inputs_embeds=None, output_attentions=False, output_hidden_states=False, return_dict=True)
    assert torch.equal(got.logits, want)
    with pytest.raises(UnsupportedArgumentError, match="past_key_values.*no cache"):
        ours(ids, decoder_input_ids=dec, past_key_values=((torch.zeros(1),),))
    with pytest.raises(UnsupportedArgumentError, match="output_hidden_states"):
        ours(ids, decoder_input_ids=dec, output_hidden_states=True)


# ------------------------------------------------------------------------------------------------
# transition scores
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=30), dict(num_beams=3, num_return_sequences=2)],
                         ids=["greedy", "sampling", "beams"])
@pytest.mark.parametrize("normalize", [False, True])
def test_compute_transition_scores_matches_transformers(pair, kw, normalize):
    ours, ref, tok = pair
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    res = []
    for model in (ours, ref):
        torch.manual_seed(11)
        out = model.generate(**batch, max_new_tokens=7, return_dict_in_generate=True, output_scores=True, **kw)
        res.append(model.compute_transition_scores(out.sequences, out.scores, getattr(out, "beam_indices", None),
                                                   normalize_logits=normalize))
        if model is ours:
            seq = out.sequences
    assert torch.equal(seq, out.sequences)
    got, want = res
    assert got.shape == want.shape and torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert rel_err(got[fin], want[fin]) < 1e-4
    if kw.get("num_beams"):
        with pytest.raises(InvalidInputError, match="beam_indices"):
            ours.compute_transition_scores(out.sequences, out.scores)
