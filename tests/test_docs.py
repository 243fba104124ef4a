"""The README and docs/ say only what works: every `python train.py` command they show composes
(its keys and values are real), every `make` target they name exists, every link resolves, and
every page of docs/ is linked from the README. What the commands do is tested where the behaviour
lives (test_claims, test_parity, test_launch, ...)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from experiments.report.parity import compose_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Launcher plugins from optional extras: a command that names one composes where it is installed.
PLUGINS = {"hydra/launcher=submitit_": "hydra_plugins.hydra_submitit_launcher"}


def code_lines(page: Path) -> list[str]:
    """Shell lines of the page's code blocks and inline code, continuation lines joined."""
    text = page.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for block in [*blocks, *inline]:
        for line in block.replace("\\\n", " ").splitlines():
            out.append(line.split(" #", 1)[0].strip())
    return out


def train_commands() -> list[tuple[str, list[str]]]:
    found = {}
    for page in PAGES:
        for line in code_lines(page):
            m = re.search(r"^(?:python|torchrun)\b.*?\btrain\.py((?:\s+[^\s|;&]+)*)", line)
            if not m or "..." in line or "…" in line:
                continue
            args = [a for a in shlex.split(m.group(1)) if not a.startswith("-")]
            found.setdefault(" ".join(args), (page.name, args))
    return sorted(found.values(), key=lambda c: (c[0], c[1]))


def first_of_each_sweep(args: list[str]) -> list[str]:
    """One job of a sweep: the first value of every comma-separated override."""
    out = []
    for a in args:
        key, sep, value = a.partition("=")
        out.append(f"{key}={value.split(',')[0]}" if sep and "," in value and "[" not in value else a)
    return out


COMMANDS = train_commands()


def test_the_docs_show_train_commands():
    assert len(COMMANDS) >= 20, COMMANDS  # the extraction itself works


@pytest.mark.parametrize(("page", "args"), COMMANDS, ids=[" ".join(a) or "(defaults)" for _, a in COMMANDS])
def test_every_train_command_in_the_docs_composes(page, args):
    for prefix, module in PLUGINS.items():
        if any(a.startswith(prefix) for a in args) and importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is an optional extra, not installed here")
    compose_config(first_of_each_sweep(args))


def test_every_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M))
    named = {
        t for page in PAGES for line in code_lines(page) for t in re.findall(r"\bmake ([a-z][a-z-]*)", line)
    }
    assert named, "no make command found in the docs"
    assert named <= targets, f"the docs name make targets the Makefile lacks: {sorted(named - targets)}"


def test_every_link_resolves_and_every_doc_is_linked_from_the_readme():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs not linked from the README: {unlinked}"


def test_the_readme_stays_short():
    lines = (REPO / "README.md").read_text().splitlines()
    # The two commands a fresh machine needs come first: run the default experiment, run the tests.
    assert [line.split()[:2] for line in lines[3:5]] == [["make", "run"], ["make", "test"]], lines[:6]
    assert len(lines) <= 120, f"README.md has {len(lines)} lines; move the depth to docs/"
