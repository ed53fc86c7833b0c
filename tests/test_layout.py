"""The repository's top-level folders never shadow an installed package.

Python run from the repository root (``python -m pytest``, ``python -c``, a script there) puts the root first
on ``sys.path``. A regular package there (a folder with ``__init__.py``) would then win every import of its
name, and Hugging Face's ``kernels`` package, which transformers imports while importing any model, is
installed beside us. ``kernels/`` is therefore a folder without ``__init__.py`` (a namespace portion, which
loses to any regular package later on the path), installed as ``encdec_fast.kernels``.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("kernels", "benchmarks", "tests", "csrc")


def run_in_root(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"in {ROOT}:\n{code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


def installed_top_level_names() -> dict[str, list[str]]:
    """Every top-level import name that an installed distribution provides, with its distributions."""
    return importlib.metadata.packages_distributions()


def test_no_top_level_folder_is_a_regular_package():
    for name in TOP_LEVEL:
        assert not (ROOT / name / "__init__.py").exists(), (
            f"{name}/__init__.py makes {name}/ a regular package that shadows any installed `{name}` when Python "
            "runs from the repository root; keep the folder a namespace portion")


def test_transformers_and_the_kernels_package_import_from_the_repository_root():
    pytest.importorskip("kernels", reason="the PyPI `kernels` package comes with transformers >= 5.25")
    out = run_in_root(
        "import transformers.models.bert.modeling_bert, transformers.models.gpt2.modeling_gpt2\n"
        "import kernels, encdec_fast.kernels.linear as klin\n"
        "print(getattr(kernels, '__file__', None))\n"
        "print(klin.__file__)\n")
    kernels_file, ours = out.split()  # the installed package (a virtual environment may sit inside the root)
    assert kernels_file != "None" and not Path(kernels_file).resolve().is_relative_to(ROOT / "kernels"), kernels_file
    assert Path(ours).resolve() == ROOT / "kernels" / "linear.py"


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_names_resolve_to_the_installed_package(name):
    """Where a dependency installs a package of the same name, importing it from the root finds that one."""
    if name not in installed_top_level_names():
        pytest.skip(f"no installed distribution provides a top-level `{name}`")
    out = run_in_root(f"import {name}; print(getattr({name}, '__file__', None) or next(iter({name}.__path__)))")
    assert not Path(out.strip()).resolve().is_relative_to(ROOT / name), out


def test_test_and_benchmark_modules_do_not_share_a_name_with_an_installed_package():
    """pytest prepends tests/ and benchmarks/ to sys.path (they have no __init__.py): a module there named
    like an installed package would shadow it during the test run."""
    installed = installed_top_level_names()
    clashes = [f"{folder}/{p.name} ({', '.join(installed[p.stem])})"
               for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py") if p.stem in installed]
    assert not clashes, f"rename these modules: {clashes}"


def test_nothing_imports_a_top_level_kernels():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import kernels", "from kernels ", "from kernels.")) or s.startswith("import kernels."):
                offenders.append(f"{path.relative_to(ROOT)}: {s}")
    assert not offenders, offenders


def _setuptools_at_least(major: int) -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= major
    except importlib.metadata.PackageNotFoundError:
        return False


def test_wheel_installs_kernels_as_encdec_fast_kernels_only(tmp_path):
    """A regular (non-editable) build: the wheel holds encdec_fast/kernels/*.py and no top-level kernels/.
    Built from a copy of the sources, so that no build/ folder of an earlier build can leak into it."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    for name in files or ["setup.py", "pyproject.toml", "README.md", "encdec_fast", "kernels", "csrc"]:
        if (ROOT / name).is_dir() and not (ROOT / name).is_symlink():
            shutil.copytree(ROOT / name, src / name, symlinks=True, dirs_exist_ok=True)
        elif (ROOT / name).exists() or (ROOT / name).is_symlink():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name, follow_symlinks=False)
    isolation = ["--no-build-isolation"] if _setuptools_at_least(77) else []  # pyproject's license field needs 77
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path),
                        str(src)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("encdec_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    ours = {Path(n).name for n in names if n.startswith("encdec_fast/kernels/")}
    expected = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert expected and expected <= ours, f"missing from the wheel: {expected - ours}"
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"encdec_fast"}, f"the wheel installs top-level {tops - {'encdec_fast'}}"
