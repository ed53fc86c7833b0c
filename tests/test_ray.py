"""encdec_fast.ray on a local Ray (one session for the whole run, 4 CPUs, no dashboard, every address
127.0.0.1): 200 rows over 2 actors give a local Engine's outputs with ids carried through and bad
rows in the error column; `encdec-fast generate --ray` over two files; the server as a Ray Serve
replica answers over HTTP like model.generate."""

import json
import os
import socket

import pytest
import torch

import encdec_fast

# single-node mode: Ray binds its services to 127.0.0.1 (read when ray is imported, hence here)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="the test extra installs ray[data,serve]")
pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="session")
def ray_session():
    """Ray's local start costs 5-15 s and ~2 GiB here: one session for the run."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the actors' torch: see conftest.one_torch_thread
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield ray
    ray.shutdown()


def rows(n, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [{"id": 1000 + i, "input": torch.randint(4, vocab, (int(torch.randint(1, 40, (1,), generator=g)),),
                                                    generator=g).tolist()} for i in range(n)]


def test_200_rows_over_2_actors_match_a_local_engine(ray_session, make_ckpt):
    import encdec_fast.ray as edr

    path = make_ckpt("bert", "gpt2")
    data = rows(200)
    data[17]["input"] = [5, 600]  # outside the vocabulary
    data[123]["input"] = []  # empty
    ds = ray.data.from_items(data)
    out = edr.generate_dataset(ds, path, num_actors=2, batch_size=16, max_batch_size=16, device="cpu",
                               max_new_tokens=6, repetition_penalty=1.2).take_all()
    with encdec_fast.Engine(encdec_fast.load(path, device="cpu")) as engine:
        want = engine.generate([r["input"] for r in data], return_exceptions=True, max_new_tokens=6,
                               repetition_penalty=1.2)
    by_id = {r["id"]: r for r in out}
    assert sorted(by_id) == [r["id"] for r in data]
    for row, w in zip(data, want):
        got = by_id[row["id"]]
        assert list(got["input"]) == row["input"]
        if isinstance(w, Exception):
            assert got["output_ids"] is None and got["num_generated"] == 0
            assert got["error"].startswith("InvalidInputError: ") and str(w) in got["error"]
        else:
            assert got["error"] is None and list(got["output_ids"]) == w.output_ids
            assert got["num_generated"] == w.num_generated and got["text"] is None
    assert "outside the vocabulary" in by_id[1017]["error"] and "empty" in by_id[1123]["error"]


def test_generate_command_over_two_files_through_ray(ray_session, make_ckpt, tmp_path):
    from encdec_fast.cli import main

    path = make_ckpt("bert", "gpt2")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"input_ids": r["input"]}) + "\n" for r in rows(5, seed=1)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n\n{broken\n")
    out = tmp_path / "out"
    rc = main(["generate", str(path), "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--output",
               str(out), "--ray", "--max-new-tokens", "5", "--device", "cpu", "--quiet"])
    assert rc == 1  # one line failed
    got = [json.loads(line) for f in sorted(out.iterdir()) for line in f.read_text().splitlines()]
    by_place = {(os.path.basename(r["file"]), r["line"]): r for r in got}
    assert sorted(by_place) == [("a.jsonl", i) for i in range(1, 6)] + [("b.jsonl", 1), ("b.jsonl", 3)]
    model = encdec_fast.load(path, device="cpu")
    for i, r in enumerate(rows(5, seed=1), 1):
        want = model.generate(torch.tensor([r["input"]]), max_new_tokens=5)[0].tolist()
        assert by_place["a.jsonl", i]["output_ids"] == want and by_place["a.jsonl", i]["error"] is None
    assert "invalid JSON" in by_place["b.jsonl", 3]["error"] and by_place["b.jsonl", 3]["output_ids"] is None


def test_ray_serve_replica_answers_like_model_generate(ray_session, make_ckpt):
    import httpx
    from ray import serve

    import encdec_fast.ray as edr

    path = make_ckpt("bert", "gpt2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(edr.serve_deployment(path, num_replicas=1, max_batch_size=8, device="cpu"), route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=60).json() == {"status": "ready"}
        model = encdec_fast.load(path, device="cpu")
        for x in ([5, 6, 7], [40, 41]):
            r = httpx.post(base + "/v1/generate", json={"input": x, "max_new_tokens": 6}, timeout=60)
            assert r.status_code == 200 and r.json()["output_ids"] == model.generate(torch.tensor([x]),
                                                                                     max_new_tokens=6)[0].tolist()
        with httpx.stream("POST", base + "/v1/generate", json={"input": [5, 6, 7], "max_new_tokens": 6,
                                                              "stream": True}, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        chunks, done = [json.loads(line[6:]) for line in lines[:-1]], json.loads(lines[-1][6:])
        assert [3] + [t for c in chunks for t in c["token_ids"]] == done["output_ids"] and len(chunks) == 6
        bad = httpx.post(base + "/v1/generate", json={"input": [5, 600]}, timeout=60)
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]
        config = serve.status().applications["default"].deployments["encdec_fast"]
        assert config.status == "HEALTHY"
    finally:
        serve.shutdown()
