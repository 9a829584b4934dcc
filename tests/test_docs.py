"""The docs as a newcomer reads them: the README's quick start runs as written and prints what the README quotes;
every page is linked and every link lands; the Makefile reinstalls only when the dependency list changes.

The quick start runs once (one module fixture, about 2-3 minutes on 2 cores, most of it the demo) in a scratch
directory, through docs/generate.py's own runner, so the test and `make docs-figures` run the same commands the
same way.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

QUICKSTART = ["quickstart-convert", "quickstart-train", "quickstart-plan", "quickstart-demo"]
# Pages other branches write (faults fragments merged into faults.md, fake CUDA, CPU speed): linked before they land.
PENDING = {"docs/faults.md", "docs/fake_cuda.md", "docs/cpu_speed.md"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def output_of(body: str) -> str:
    """A quoted block's output: its lines without the fences and the `$ ...` command lines."""
    return "\n".join(line for line in body.splitlines() if not line.startswith(("```", "$ ")))


@pytest.fixture(scope="module")
def quickstart():
    """Every quick-start command of README.md, run as written in one scratch directory: {block: (quoted, printed)}."""
    quoted = gen.blocks()
    work = gen.scratch()
    try:
        done = {}
        for name in QUICKSTART:
            cmds = gen.commands(quoted[name])
            assert cmds, f"README block {name} quotes no command"
            done[name] = (quoted[name], "".join(gen.run(c, work) for c in cmds))
        yield work, done
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_the_quick_start_demo_prints_the_quoted_table(quickstart):
    work, done = quickstart
    quoted, printed = done["quickstart-demo"]
    rows = gen.table_rows(quoted)
    assert len(rows) == 2 + 16, "the README should quote the demo's whole table (16 rows)"
    assert gen.table_rows(printed) == rows, "README's demo table is stale: run `make docs-figures`"
    for png in ("batch_size.png", "lr_sweep.png"):  # step 5 of the quick start opens them
        assert (work / "runs/demo/analysis" / png).stat().st_size > 0


@pytest.mark.slow
def test_the_quick_start_plan_convert_and_train_print_what_is_quoted(quickstart):
    work, done = quickstart
    for name in ("quickstart-convert", "quickstart-plan"):
        quoted, printed = done[name]
        assert printed.strip() == output_of(quoted).strip(), f"README block {name} is stale: run `make docs-figures`"
    quoted, printed = done["quickstart-train"]
    result = re.compile(r"done: .*final train loss [\d.]+")  # the rest of the line is a speed
    assert result.search(printed)[0] == result.search(quoted)[0]
    assert (work / "runs/one/result.json").is_file() and any((work / "runs/one/tb").iterdir())


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {t.split("#")[0] for t in LINK.findall(readme)}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), "every docs page is linked from the README"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_lands_on_a_file_and_heading():
    for doc in gen.DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            rel = dest.relative_to(ROOT).as_posix()
            if rel in PENDING and not dest.exists():
                continue
            assert dest.exists(), f"{doc.name}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                heads = {slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
                assert anchor in heads, f"{doc.name}: no heading #{anchor} in {rel}"


def test_every_generated_block_has_its_generator():
    assert set(gen.blocks()) <= set(gen.GENERATORS)
    assert set(QUICKSTART) <= set(gen.blocks())


def _make(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(tmp), *args], capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reinstalls_only_when_the_dependency_list_changes(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    touch = [line for line in _make(tmp_path, "-n", "venv").stdout.splitlines() if line.startswith("touch ")]
    stamp = tmp_path / touch[0].split()[1]  # the stamp make would write after installing
    stamp.parent.mkdir()
    stamp.touch()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('addopts = "-ra"', 'addopts = "-ra -q"'))  # newer, same deps
    assert _make(tmp_path, "-q", "venv").returncode == 0, "a fresh checkout (newer pyproject.toml) must not reinstall"
    pyproject.write_text(pyproject.read_text().replace('"pyyaml",', '"pyyaml>=6",'))
    assert _make(tmp_path, "-q", "venv").returncode == 1, "a changed dependency must reinstall"
