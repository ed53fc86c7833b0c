"""The `encdec-fast` command: generate from JSONL ids and from text (tokenizer in the folder), errors, demo."""

import json
import shutil

import torch

import encdec_fast
from encdec_fast.cli import main


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_generate_from_jsonl_ids_matches_model_generate(make_ckpt, tmp_path, capsys):
    ckpt = make_ckpt("bert", "gpt2")
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"input_ids": [5, 6, 7, 8, 9]}), json.dumps({"input_ids": [10, 11]})])
    out = tmp_path / "out.jsonl"
    rc = main(["generate", str(ckpt), "--input", str(inp), "--output", str(out), "--max-new-tokens", "6",
               "--num-beams", "2", "--quiet", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = encdec_fast.load(ckpt, device="cpu")
    for row, ids in zip(rows, ([5, 6, 7, 8, 9], [10, 11])):
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, num_beams=2)[0].tolist()
        assert row["output_ids"] == want
    assert "tokens/s" in capsys.readouterr().err


def test_generate_from_text_uses_the_folders_tokenizer(make_ckpt, tmp_path):
    from transformers import BertTokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("bert", "gpt2"), ckpt)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]  # 97 = model vocab
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(ckpt)
    inp = _write(tmp_path / "in.txt", ["w1 w2 w3", "w7 w8"])
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(ckpt), "--input", str(inp), "--output", str(out), "--max-new-tokens", "4",
                 "--quiet", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(isinstance(r["text"], str) for r in rows)
    model = encdec_fast.load(ckpt, device="cpu")
    ids = BertTokenizer.from_pretrained(str(ckpt))("w1 w2 w3")["input_ids"]
    assert rows[0]["output_ids"] == model.generate(torch.tensor([ids]), max_new_tokens=4)[0].tolist()


def test_text_without_a_tokenizer_reports_a_clear_error(make_ckpt, tmp_path):
    inp = _write(tmp_path / "in.txt", ["some text"])
    out = tmp_path / "out.jsonl"
    rc = main(["generate", str(make_ckpt("bert", "gpt2")), "--input", str(inp), "--output", str(out), "--quiet",
               "--device", "cpu"])
    assert rc == 1
    assert "tokenizer" in json.loads(out.read_text().splitlines()[0])["error"]


def test_missing_checkpoint_and_empty_input_exit_with_an_error(tmp_path, capsys):
    inp = _write(tmp_path / "in.txt", ["x"])
    assert main(["generate", str(tmp_path / "nope"), "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = _write(tmp_path / "empty.txt", [""])
    assert main(["generate", str(tmp_path), "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no inputs" in capsys.readouterr().err


def test_demo_builds_a_model_and_reports_identical_tokens(capsys):
    assert main(["demo", "--size", "tiny", "--batch", "2", "--src-len", "9", "--new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "identical tokens: True" in out and "tokens/s" in out
