"""The `encdec-fast` command: generate from JSONL ids and from text (tokenizer in the folder), errors, demo."""

import json
import shutil

import pytest
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


def test_output_path_is_checked_before_any_work(make_ckpt, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"input_ids": [5, 6]})])
    for out, words in ((tmp_path / "no" / "such" / "dir" / "out.jsonl", "does not exist"), (tmp_path, "is a folder")):
        # a bogus checkpoint too: the output is reported first, before anything is loaded or generated
        assert main(["generate", str(tmp_path / "nope"), "--input", str(inp), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and "--output" in err and err.count("\n") == 1, err


def test_an_older_output_file_never_passes_for_this_runs(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"input_ids": [5, 6]})])
    out = _write(tmp_path / "out.jsonl", [json.dumps({"index": 0, "output_ids": [3, 1, 2]})])  # from an earlier run
    assert main(["generate", str(tmp_path / "nope"), "--input", str(inp), "--output", str(out)]) == 2
    assert out.read_text() == ""


def test_malformed_and_undecodable_lines_become_error_records_and_the_run_goes_on(make_ckpt, tmp_path, capsys):
    ckpt = make_ckpt("bert", "gpt2")
    lines = [json.dumps({"input_ids": [5, 6, 7]}).encode(), b'{"input_ids": [5, 6', b"\xff\xfe not utf-8 \xc3",
             json.dumps({"tokens": [1]}).encode(), json.dumps({"input_ids": "5 6"}).encode(), b"",
             json.dumps({"input_ids": [5, 500]}).encode(), json.dumps({"input_ids": [9, 10, 11, 12]}).encode()]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    rc = main(["generate", str(ckpt), "--input", str(inp), "--output", str(out), "--max-new-tokens", "4", "--quiet",
               "--device", "cpu"])
    assert rc == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(7))  # input order; the blank line is no input
    model = encdec_fast.load(ckpt, device="cpu")
    for i, ids in ((0, [5, 6, 7]), (6, [9, 10, 11, 12])):
        assert rows[i]["output_ids"] == model.generate(torch.tensor([ids]), max_new_tokens=4)[0].tolist()
    expect = {1: (2, "invalid JSON"), 2: (3, "not UTF-8"), 3: (4, "needs a \"text\" or an \"input_ids\""),
              4: (5, "must be a list of token ids"), 5: (None, "outside the vocabulary")}
    for i, (line, words) in expect.items():
        assert words in rows[i]["error"] and rows[i].get("line") == line, rows[i]
    err = capsys.readouterr().err
    assert "7 inputs, 5 errors" in err and "input 2 (line 3): InvalidInputError: the line is not UTF-8" in err, err


def test_ctrl_c_keeps_the_finished_lines_and_exits_130(make_ckpt, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    ckpt = make_ckpt("bert", "gpt2")
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"input_ids": [5 + i % 80, 6, 7]}) for i in range(200)])
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "encdec_fast.cli", "generate", str(ckpt), "--input", str(inp), "--output",
                          str(out), "--max-new-tokens", "60", "--min-new-tokens", "60", "--batch-size", "2", "--quiet",
                          "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0 and "interrupted" in stderr, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 3 <= len(rows) < 200 and f"{len(rows)} of 200 inputs finished" in stderr, (len(rows), stderr)
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows) and all("output_ids" in r for r in rows)
    model = encdec_fast.load(ckpt, device="cpu")
    for r in rows[:3]:
        ids = [5 + r["index"] % 80, 6, 7]
        assert r["output_ids"] == model.generate(torch.tensor([ids]), max_new_tokens=60, min_new_tokens=60)[0].tolist()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_demo_on_a_machine_without_cuda_says_so_in_one_line(capsys):
    assert main(["demo", "--size", "tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA" in err and "Traceback" not in err and err.count("\n") == 1, err
