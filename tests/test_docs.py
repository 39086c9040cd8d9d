"""The documentation speaks for itself and stays true to the project.

- No file of the project (what `git ls-files` lists, plus new files git does not ignore) holds a path of the
  machine it was written on, a pointer outside the repository (`../shared`), or wording that only makes sense to
  its authors ("no GPU was lent", "the issue's figures", "not run here").
- The course the project follows is named in full once, in one Markdown file; other pages link there.
- Every `make X`, `python -m X` and `qlora-pipeline X` written in README.md and docs/*.md exists: a Makefile
  target, an importable module, a subcommand of qlora_pipeline/cli.py's `build_parser()`.
- Every relative link in README.md and docs/*.md reaches a file of the repository, and a heading of it when the
  link names one.
- Every ```python block of README.md and docs/*.md says whether it runs (`<!-- docs-test: run -->` on the line
  before it) or why not (`<!-- docs-test: skip: <reason> -->`); those that run do, against the champion of a tiny
  random model registered in a throwaway MLflow store.

Each failure names the file, the line and what was found there.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.util
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()

# ---------------------------------------------------------------------------------------------------------------
# What the project's files hold


@functools.cache
def project_files() -> dict[str, str]:
    """{path: text} of every text file git tracks or would track (untracked files it does not ignore), but this
    module, DVC's pointer files and binary files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    files = {}
    for name in sorted({entry.decode() for entry in listed.split(b"\0") if entry}):
        path = REPO / name
        if name == THIS_FILE or name.endswith(".dvc") or not path.is_file():  # a tracked file deleted in the tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


def doc_pages() -> list[str]:
    """README.md and docs/*.md: the pages a reader reads."""
    return ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


def markdown_files() -> list[str]:
    return [name for name in project_files() if name.endswith(".md")]


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


# ---------------------------------------------------------------------------------------------------------------
# 1. Nothing of the authors' context

# A path on one machine: /work/..., /root/..., /tmp/<something>, /home/<user>, /Users/<user>. The character
# before the slash must not continue a word or a path (".dvc/tmp/exps" and "https://host/tmp/x" are not machine
# paths; "sqlite:////tmp/x" is one), and /tmp alone is the system's folder, not a path of one machine.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:(?:work|root)/|(?:tmp|home|Users)/(?=[\w.-]))[^\s\"'`)\];,\\]*")
OUTSIDE_REPO = re.compile(r"\.\./shared\b")

# Wording that speaks of the authors' machine, session or tracker; each is precise enough to mean nothing else.
AUTHOR_CONTEXT_ANYWHERE = [
    r"DESIGN\.md",
    r"design notes",
    r"\blent\b",  # "no GPU was lent", "a machine was lent"
    r"\bthe issue\b(?!s)",  # "the figures", "the levers the issue names": which issue?
    r"\bno Hub access\b",
    r"\blocal disk here\b",
    r"\bthese machines\b",
    r"\bthe project's machines\b",
    r"\bthis project's (?:\d+-core )?machine\b",
    r"\bno database server\b",
]
# In the pages a reader reads, "this machine" and "here" are the authors' (code may say them of the machine or
# environment it runs in: "the versions installed here").
AUTHOR_CONTEXT_IN_MARKDOWN = [
    r"\bthis machine\b",
    r"\b(?:not run|ran|tested|checked|measured|installed|available) here\b",
    r"\bthese (?:\d+ )?cores\b",
    r"\bin the session that\b",
]

# (file, what a rule finds there): what must stay, each with its reason; none so far. An entry that no longer
# matches fails the test, so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    found: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.found!r} ({self.rule})"


def context_findings() -> list[Finding]:
    findings = []
    for name, text in project_files().items():
        rules = [(MACHINE_PATH, "a path on one machine"), (OUTSIDE_REPO, "a path outside the repository")]
        phrases = AUTHOR_CONTEXT_ANYWHERE + (AUTHOR_CONTEXT_IN_MARKDOWN if name.endswith(".md") else [])
        rules += [(re.compile(p, re.IGNORECASE), "wording of the authors' context") for p in phrases]
        for pattern, rule in rules:
            for match in pattern.finditer(text):
                findings.append(Finding(name, line_of(text, match.start()), match.group(), rule))
    return findings


def test_no_file_speaks_of_the_authors_machine_or_points_outside_the_repository():
    findings = context_findings()
    bad = [f for f in findings if (f.file, f.found) not in ALLOWED]
    stale = sorted(set(ALLOWED) - {(f.file, f.found) for f in findings})
    assert not bad, "write for a reader who has only this repository:\n" + "\n".join(map(str, bad))
    assert not stale, f"remove these entries of ALLOWED in {THIS_FILE}, which match nothing now: {stale}"


# ---------------------------------------------------------------------------------------------------------------
# 2. The course, named once

COURSE = "LLM Engineering: Master AI, Large Language Models & Agents"


def test_the_course_is_named_in_full_once():
    name_in_prose = re.compile(r"\s+".join(map(re.escape, COURSE.split())))  # a line may break anywhere in it
    places = []
    for name in markdown_files():
        text = project_files()[name]
        places += [f"{name}:{line_of(text, m.start())}" for m in name_in_prose.finditer(text)]
    assert len(places) == 1, f"{COURSE!r} should appear once, in one Markdown file; it is at {places or 'none'}"


# ---------------------------------------------------------------------------------------------------------------
# 3. Commands and links that exist

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<mark>```|~~~)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=mark)[ \t]*$",
                   re.MULTILINE | re.DOTALL)  # fmt: skip
INLINE_CODE = re.compile(r"(`+)(?P<code>.+?)\1", re.DOTALL)


@dataclass(frozen=True)
class Code:
    file: str
    line: int
    text: str


SHELL_COMMENT = re.compile(r"(?:^|\s)#.*")  # in a fenced block; "# terminal 2: ..." is prose
SHELL_END = re.compile(r"[;&|#)`]")  # what ends a command's words


@functools.cache
def code_of(name: str) -> list[Code]:
    """The code in a Markdown page: each line of its fenced blocks without its comment (prose), and its inline
    code spans."""
    text, pieces, prose = project_files()[name], [], []
    last = 0
    for block in FENCE.finditer(text):
        prose.append((last, text[last : block.start()]))
        last = block.end()
        start = line_of(text, block.start("body"))
        lines = block.group("body").splitlines()
        pieces += [Code(name, start + i, SHELL_COMMENT.sub("", line)) for i, line in enumerate(lines)]
    prose.append((last, text[last:]))
    for offset, part in prose:
        for span in INLINE_CODE.finditer(part):
            pieces.append(Code(name, line_of(text, offset + span.start()), span.group("code")))
    return pieces


def prose_of(text: str) -> str:
    """The page without its fenced blocks (lines kept, so offsets still give line numbers)."""
    return FENCE.sub(lambda block: "\n" * block.group().count("\n"), text)


def command_words(code: str, command: str, after_slash: bool = False) -> list[list[str]]:
    """The words after each `command` in a line of code, up to the end of that shell command; `after_slash`: also
    where a folder precedes it (`.venv/bin/python`)."""
    found = []
    before = r"[\w.$-]" if after_slash else r"[\w./$-]"
    for match in re.finditer(rf"(?<!{before}){command}(?![\w.-])", code):
        rest = SHELL_END.split(code[match.end() :], maxsplit=1)[0]
        found.append([word.strip("'\",:") for word in rest.split()])
    return found


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for line in text.splitlines():
        if line.startswith((".PHONY:", ".PHONY :")):
            targets.update(line.split(":", 1)[1].split())
        elif (rule := re.match(r"^([A-Za-z0-9_.%/-]+(?:[ \t]+[A-Za-z0-9_.%/-]+)*)[ \t]*:(?!=)", line)) is not None:
            targets.update(name for name in rule.group(1).split() if not name.startswith("."))
    return targets


def placeholder(word: str) -> bool:
    """`<name>`, `bench-*`, `$VAR`, `[--jobs N]`, `NAME`: a word that stands for others."""
    return any(mark in word for mark in "<>*$[]{}") or word.isupper()


def make_targets_written() -> list[tuple[Code, str]]:
    written = []
    for name in doc_pages():
        for code in code_of(name):
            for words in command_words(code.text, "make"):
                names = [w for w in words if "=" not in w and not w.startswith("-")]
                if names and not placeholder(names[0]):
                    written.append((code, names[0]))
    return written


def test_every_make_target_in_the_docs_is_in_the_makefile():
    targets = makefile_targets()
    written = make_targets_written()
    missing = [f"{c.file}:{c.line}: make {target}" for c, target in written if target not in targets]
    assert written, "no `make` command found in the docs: the parser is broken"
    assert not missing, "not a target of the Makefile:\n" + "\n".join(missing)


def module_exists(name: str) -> bool:
    """Whether `python -m name` finds a module, without importing anything (the top-level name is looked up on
    sys.path, each submodule in its package's folder)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    for part in rest:
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec is not None


def modules_written() -> list[tuple[Code, str]]:
    written = []
    for name in doc_pages():
        for code in code_of(name):
            for words in command_words(code.text, r"python3?", after_slash=True):
                if len(words) >= 2 and words[0] == "-m" and not placeholder(words[1]):
                    written.append((code, words[1]))
    return written


def test_every_python_dash_m_in_the_docs_names_a_module():
    written = modules_written()
    missing = [f"{c.file}:{c.line}: python -m {module}" for c, module in written if not module_exists(module)]
    assert written, "no `python -m` found in the docs: the parser is broken"
    assert not missing, "no such module:\n" + "\n".join(missing)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_written() -> list[tuple[Code, list[str]]]:
    """Each `qlora-pipeline ...` in the docs' code, as the words that name its subcommand (and `params`'
    action), options and placeholders left out."""
    written = []
    for name in doc_pages():
        for code in code_of(name):
            for words in command_words(code.text, r"(?:\.venv/bin/)?qlora-pipeline"):
                names = []
                for word in words:
                    if word.startswith("-") or placeholder(word):
                        if names or placeholder(word):
                            break  # an option's value or a placeholder follows: no more subcommand names
                        continue
                    names.append(word)
                    if names[0] != "params" or len(names) == 2:
                        break
                written.append((code, names))
    return written


def test_every_qlora_pipeline_subcommand_in_the_docs_exists():
    from qlora_pipeline.cli import build_parser  # the console script (pyproject's [project.scripts])

    commands = subcommands(build_parser())
    written = cli_written()
    missing = []
    for code, names in written:
        if not names:
            continue
        sub = commands.get(names[0])
        if sub is None:
            missing.append(f"{code.file}:{code.line}: qlora-pipeline {names[0]} (subcommands: {sorted(commands)})")
        elif len(names) > 1 and names[1] not in subcommands(sub):
            missing.append(f"{code.file}:{code.line}: qlora-pipeline {' '.join(names)}")
    assert written, "no `qlora-pipeline` command found in the docs: the parser is broken"
    assert not missing, "not a subcommand of qlora-pipeline:\n" + "\n".join(missing)


HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens, "-1" and on
    for repeats."""
    seen: dict[str, int] = {}
    for heading in HEADING.finditer(prose_of(text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading_of_the_repository():
    broken = []
    for name in doc_pages():
        text = project_files()[name]
        for link in LINK.finditer(prose_of(text)):
            target = link.group("target")
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            where = f"{name}:{line_of(text, link.start())}: ({target})"
            path, _, anchor = target.partition("#")
            resolved = (REPO / name).parent.joinpath(path).resolve() if path else REPO / name
            if not resolved.is_relative_to(REPO):
                broken.append(f"{where}: outside the repository")
            elif not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
                broken.append(f"{where}: no heading #{anchor} there")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------------------------------------------
# 4. Python blocks that run

MARK = re.compile(r"<!--\s*docs-test:\s*(?P<verdict>run|skip)\s*(?::\s*(?P<reason>.*?))?\s*-->")


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    code: str
    verdict: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def python_blocks() -> list[Block]:
    blocks = []
    for name in doc_pages():
        text = project_files()[name]
        for block in FENCE.finditer(text):
            if block.group("info").strip().split(" ")[0] not in ("python", "py"):
                continue
            before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            blocks.append(
                Block(
                    name,
                    line_of(text, block.start()),
                    block.group("body"),
                    mark.group("verdict") if mark else None,
                    (mark.group("reason") or "") if mark else "",
                )
            )
    return blocks


def test_every_python_block_in_the_docs_says_whether_it_runs():
    blocks = python_blocks()
    unmarked = [str(b) for b in blocks if b.verdict is None]
    unexplained = [str(b) for b in blocks if b.verdict == "skip" and not b.reason]
    assert not unmarked, (
        "put `<!-- docs-test: run -->` or `<!-- docs-test: skip: <why> -->` on the line before each ```python "
        "block:\n" + "\n".join(unmarked)
    )
    assert not unexplained, "a skipped block says why (`<!-- docs-test: skip: <why> -->`):\n" + "\n".join(unexplained)
    assert any(b.file == "README.md" and b.verdict == "run" for b in blocks), "README.md has no block that runs"


@pytest.fixture(scope="module")
def tiny_champion(pipeline_project, tmp_path_factory):
    """A throwaway MLflow store whose registered model `qlora-price-adapter` has the tiny project's adapter, as
    record_run logs it (serving/pricer.py), under the alias `champion`: (folder, tracking URI)."""
    from mlflow import MlflowClient

    from serving.pricer import log_model
    from stages.common.io import read_jsonl

    paths, params, _ = pipeline_project
    folder = tmp_path_factory.mktemp("docs-champion")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("docs", artifact_location=(folder / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    model = log_model(client, run.info.run_id, params, paths, read_jsonl(paths.split("test"))[:2])
    client.set_terminated(run.info.run_id)
    name = params.tracking.registered_model
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run.info.run_id, model_id=model.model_id
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return folder, uri


def test_the_python_blocks_marked_to_run_run_against_a_tiny_champion(tiny_champion, tmp_path, monkeypatch):
    _, uri = tiny_champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    runnable = [b for b in python_blocks() if b.verdict == "run"]
    assert runnable
    for block in runnable:
        try:
            exec(compile(block.code, str(block), "exec"), {"__name__": "__docs__"})
        except Exception as exc:
            raise AssertionError(f"the block at {block} fails: {exc!r}") from exc
