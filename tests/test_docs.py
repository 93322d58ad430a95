"""The documentation cannot go stale quietly.

Every `budgetlora ...` line in a fenced code block of README.md or docs/*.md is parsed by the real command-line
parser (a renamed command or flag fails here), commands that take a config also build it (a renamed preset or an
invalid value fails), every `configs/...` file, `scripts/...` or `benchmarks/...` script a block names exists, and
every relative link points at an existing file (and heading, where it names one). Nothing is run: the long commands
(train, submit, sweep) are run for real by scripts/main.sh, .ci/wheel-check.sh and benchmarks/*.py.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from budgetlora import config as config_mod
from budgetlora.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,}|~{3,})")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_OPS = {"&", "&&", "|", "||", ";"}
REPO_PATH = re.compile(r"^(configs|scripts|benchmarks|\.ci)/[\w./-]+$")


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) inside fenced code blocks; backslash continuations joined."""
    out, fence, pending, start = [], None, "", 0
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line.strip())
        if fence is None:
            if m:
                fence = m.group(1)[0]
            continue
        if m and m.group(1)[0] == fence and line.strip().strip(fence) == "":
            fence, pending = None, ""
            continue
        if not pending:
            start = no
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def words(line: str) -> list[str]:
    try:
        w = shlex.split(line, comments=True)
    except ValueError:  # not shell (Python, YAML): no command here
        return []
    while w and ENV.match(w[0]):  # OMP_NUM_THREADS=1 budgetlora ...
        w = w[1:]
    for i, word in enumerate(w):  # the command ends at a shell operator: `... &`, `... | head`, `> out.txt`
        if word in SHELL_OPS or word.startswith((">", "2>")):
            return w[:i]
    return w


def commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for no, line in code_lines(doc):
            w = words(line)
            if w and w[0] == "budgetlora":
                found.append((f"{doc.relative_to(ROOT)}:{no}", w))
            elif "$(which" in line and "budgetlora)" in line:  # torchrun ... $(which budgetlora) train ...
                i = line.index("budgetlora)") + len("budgetlora)")
                found.append((f"{doc.relative_to(ROOT)}:{no}", ["budgetlora", *words(line[i:])]))
    return found


COMMANDS = commands()


def strict_parser() -> argparse.ArgumentParser:
    """The CLI's parser without argparse's prefix matching, so that `--track` in the docs does not pass for a real
    `--tracking` (or a renamed flag for a longer one)."""
    parser = build_parser()
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 20, f"only {len(COMMANDS)} `budgetlora` command lines found in the docs"


def test_every_command_of_the_cli_is_documented():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented = {w[1] for _, w in COMMANDS if len(w) > 1}
    missing = sorted(set(sub.choices) - documented)
    assert not missing, f"commands with no example in README.md or docs/: {missing}"


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    args = argv[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = strict_parser().parse_args(args)
    except SystemExit as e:
        if ("--help" in args or "-h" in args) and e.code == 0:
            return
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {err.getvalue().strip()}")
    own_file = str(getattr(ns, "config", "") or "").endswith((".yaml", ".yml")) and not ns.config.startswith("configs/")
    if "config" in vars(ns) and not own_file:  # a shipped preset (by name or under configs/) and every value in the
        # line must make a config; a reader's own file (`--config serve.yaml`) is a placeholder, only parsed
        try:
            config_mod.from_flags(ns)
        except Exception as e:  # noqa: BLE001 - any failure to build the config is the finding
            pytest.fail(f"{where}: `{shlex.join(argv)}` parses but its config does not build: {e}")


def test_files_named_in_code_blocks_exist():
    missing = []
    for doc in DOCS:
        for no, line in code_lines(doc):
            for w in words(line):
                w = w.split("=", 1)[-1]
                if REPO_PATH.match(w) and not (ROOT / w).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{no}: {w}")
    assert not missing, "\n".join(missing)


def test_the_architecture_page_names_every_module():
    """docs/architecture.md lists each module of the package with one line, and names no module that is gone."""
    pkg = ROOT / "src" / "budgetlora"
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"^([a-z_]+/[a-z_]+\.py|[a-z_]+\.py)\s", text, flags=re.MULTILINE))
    modules = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
               if p.name != "__init__.py" and "presets" not in p.parts} | {"config/__init__.py"}
    assert not modules - named, f"modules missing from docs/architecture.md: {sorted(modules - named)}"
    assert not named - modules - {"config/__init__.py"}, f"docs/architecture.md names modules that do not exist: " \
        f"{sorted(named - modules)}"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, fence = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def test_every_relative_link_points_at_a_file():
    broken = []
    for doc in DOCS:
        text = re.sub(r"(?ms)^(`{3,}).*?^\1", "", doc.read_text())  # links inside code blocks are not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_checks_catch_a_stale_command(tmp_path):
    stale = tmp_path / "stale.md"
    stale.write_text("text\n\n```bash\nbudgetlora train --config minilm-quick \\\n    --train.epochz 2\n```\n")
    [(no, line)] = code_lines(stale)
    assert no == 4 and words(line)[:2] == ["budgetlora", "train"]
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        strict_parser().parse_args(words(line)[1:])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):  # a prefix of a real flag
        strict_parser().parse_args(["train", "--config", "minilm-quick", "--train.epoch", "2"])
