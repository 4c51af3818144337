"""The manual against the tree: what README.md and docs/*.md name exists, and what they run is accepted.

Fast and with no model run. Checked:
- every relative link resolves to a file of the repository, and its `#anchor` to a heading of that file
  (GitHub's rule: lower case, punctuation dropped, spaces to hyphens, `-1`, `-2` for repeats);
- every `python -m MODULE` in a code block or an inline code span names a module that can be imported
  (`importlib.util.find_spec`): one of this repository's, or a tool such as pip;
- every path under a folder of this repository (`scripts/`, `bench/`, `llava_tiny/`, `data_tools/`, `eval/`,
  `tests/`, `zero_configs/`, `docs/`) exists (a glob matches something), and a test node id
  `tests/x.py::name` (or a following `::name`) names a function or class of that file;
- a code name written beside a file, "`file.py` (`name`, ...)", "`name` in `file.py`" or
  "`name` (`file.py`", is a word of that file (names with `_`, `(` or capitals: `build_projector`,
  `ChatTemplate(...)`, `@register("x")`), so the map of where things live follows the code;
- for `python -m data_tools.X` / `eval.X` / `bench.X` / `llava_tiny.X` and `python scripts/X.py` commands,
  every `--flag` on the command line is an option of the parser that command builds (for
  `data_tools.convert`, of the named subcommand's parser too). The parser is captured by running the
  module as `__main__` with `ArgumentParser.parse_known_args` replaced by a stop, so nothing past the
  parser runs; a flag must be spelled in full (argparse would also take an abbreviation);
- for `bash scripts/X.sh` whose argument loop refuses unknown arguments (`demo.sh`), every `--flag` is
  one of its `case` labels;
- README.md is a front page (at most 250 lines) linking every page of docs/, and no page is over 500 lines.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import re
import runpy
import shlex
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("scripts", "bench", "llava_tiny", "data_tools", "eval", "tests", "zero_configs", "docs")
OUR_PACKAGES = ("data_tools", "eval", "bench", "llava_tiny")
KNOWN_TOOLS = {"pip"}  # `python -m pip ...` in install steps; not always in a uv-made environment
SEPARATORS = {"|", "||", "&&", ";", "&"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_and_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line number, line) of prose and of code blocks (fenced, or indented by four spaces after a blank line)."""
    prose, code, fence, indented, previous = [], [], False, False, ""
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            indented = line.startswith("    ") and (indented or not previous.strip()) and bool(line.strip())
        (code if fence or indented else prose).append((number, line))
        previous = line
    return prose, code


def headings(path: Path) -> set[str]:
    slugs, seen = set(), {}
    prose, _ = prose_and_code(path.read_text())
    for _, line in prose:
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def inline_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans of the prose (a span may wrap onto the next line), with the line it starts on."""
    text = "\n".join(line for _, line in prose)
    numbers = [number for number, _ in prose]
    return [(numbers[text.count("\n", 0, m.start())], m.group(1).replace("\n", " "))
            for m in re.finditer(r"`([^`]+)`", text)]


def commands(page: Path) -> list[tuple[int, list[str]]]:
    """Each shell command of the page's code blocks and inline spans, as (line, tokens): continuation lines
    joined, a `$ ` prompt and comments dropped, `[--optional flags]` unbracketed, split at |, &&, ;."""
    prose, code = prose_and_code(page.read_text())
    lines, pending, start = [], "", 0
    for number, line in code:
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending, start = "", 0
    lines += inline_spans(prose)
    found = []
    for number, line in lines:
        line = re.sub(r"^\s*\$ ", "", line)
        if not re.search(r"\bpython3? |\bbash scripts/", line):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in an example: split on spaces
            tokens = line.split(" #")[0].split()
        tokens = [token.strip("[]") for token in tokens]
        command = []
        for token in tokens + [";"]:
            if token in SEPARATORS:
                if command:
                    found.append((number, command))
                command = []
            else:
                command.append(token)
    return found


def long_flags(tokens: list[str]) -> list[str]:
    flags = []
    for token in tokens:
        match = re.fullmatch(r"(--[A-Za-z][\w-]*)(=.*)?", token)
        if match:
            flags.append(match.group(1))
    return flags


class _Stop(Exception):
    def __init__(self, parser):
        self.parser = parser


def captured_parser(module: str | None = None, path: Path | None = None) -> argparse.ArgumentParser:
    """The parser that `python -m module` (or `python path`) builds, stopped before it parses anything."""
    def stop(self, args=None, namespace=None):
        raise _Stop(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = stop
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules ... prior to execution"
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(path), run_name="__main__")
    except _Stop as stop_:
        return stop_.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{module or path}: built no argparse parser when run as __main__")


def options(parser: argparse.ArgumentParser, positionals: list[str]) -> set[str]:
    names = {name for action in parser._actions for name in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((p for p in positionals if p in action.choices), None)
            if chosen:
                names |= options(action.choices[chosen], [])
    return names


def test_relative_links_and_anchors_resolve():
    problems = []
    for page in PAGES:
        prose, _ = prose_and_code(page.read_text())
        for number, line in prose:
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                destination = (page.parent / file_part).resolve() if file_part else page
                where = f"{rel(page)}:{number}: ({target})"
                if not destination.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and destination.suffix == ".md" and anchor not in headings(destination):
                    problems.append(f"{where}: no heading #{anchor} in {rel(destination)}")
    assert not problems, "\n".join(problems)


def test_python_m_modules_import():
    problems = []
    for page in PAGES:
        for number, tokens in commands(page):
            for i, token in enumerate(tokens[:-2]):
                if re.fullmatch(r"python3?", token) and tokens[i + 1] == "-m":
                    module = tokens[i + 2]
                    if re.search(r"[<>]|\.[A-Z]$", module):  # a placeholder: data_tools.<name>, data_tools.X
                        continue
                    if module not in KNOWN_TOOLS and importlib.util.find_spec(module) is None:
                        problems.append(f"{rel(page)}:{number}: python -m {module}: no such module")
    assert not problems, "\n".join(problems)


def test_repository_paths_and_test_ids_exist():
    path_pattern = re.compile(r"(?<![\w./-])((?:%s)/[\w./*-]*)" % "|".join(REPO_DIRS))
    problems = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().split("\n"), 1):
            where = f"{rel(page)}:{number}"
            for path in path_pattern.findall(line):
                path = path.split("::")[0].rstrip(".,:;")
                if not glob.glob(str(ROOT / path)):
                    problems.append(f"{where}: {path}: no such file or folder")
            test_file = None
            for file, name in re.findall(r"(tests/[\w/]+\.py)?::(\w+)", line):
                test_file = file or test_file
                if test_file and (ROOT / test_file).exists():
                    if not re.search(rf"^\s*(?:async )?(?:def|class) {name}\b", (ROOT / test_file).read_text(), re.M):
                        problems.append(f"{where}: {test_file}::{name}: no such test")
    assert not problems, "\n".join(problems)


def source_file(path: str) -> Path | None:
    """A file named in the manual: relative to the repository, else the one file of that name in the package folders."""
    if (ROOT / path).is_file():
        return ROOT / path
    found = [f for folder in OUR_PACKAGES + ("scripts",) for f in (ROOT / folder).rglob(path)]
    return found[0] if len(found) == 1 else None


def code_name(span: str) -> str | None:
    """`build_projector`, `ChatTemplate(...)`, `@register("x")` -> the name; None for a value or a flag."""
    match = re.fullmatch(r"@?([A-Za-z_]\w*)(\(.*\))?", span.strip())
    if match and ("_" in match.group(1) or match.group(2) or span.startswith("@")
                  or re.search(r"[a-z][A-Z]|^[A-Z][a-z]+[A-Z]", match.group(1))):
        return match.group(1)
    return None


def test_code_names_beside_a_file_are_in_that_file():
    file_span = r"`([\w./-]+\.(?:py|sh))`"
    forms = [re.compile(file_span + r" \(([^)]*)\)"),                           # `file.py` (`a`, `b`)
             re.compile(r"`([^`]+)`[^`]{0,30}? in " + file_span),               # `name` ... in `file.py`
             re.compile(r"`([^`]+)` \(" + file_span)]                          # `name` (`file.py`
    problems = []
    for page in PAGES:
        text = " ".join(line for _, line in prose_and_code(page.read_text())[0])
        pairs = [(path, span) for path, inside in forms[0].findall(text) for span in re.findall(r"`([^`]+)`", inside)]
        pairs += [(path, span) for span, path in forms[1].findall(text) + forms[2].findall(text)]
        for path, span in pairs:
            name, source = code_name(span), source_file(path)
            if name and source and not re.search(rf"\b{re.escape(name)}\b", source.read_text()):
                problems.append(f"{rel(page)}: `{span}` is not in {rel(source)}")
    assert not problems, "\n".join(problems)


def test_flags_on_our_commands_are_accepted():
    parsers, problems, checked = {}, [], 0
    for page in PAGES:
        for number, tokens in commands(page):
            for i, token in enumerate(tokens):
                if not re.fullmatch(r"python3?", token) or i + 1 >= len(tokens):
                    continue
                if tokens[i + 1] == "-m" and i + 2 < len(tokens) and tokens[i + 2].split(".")[0] in OUR_PACKAGES:
                    target, rest = tokens[i + 2], tokens[i + 3:]
                    if re.search(r"[<>]|\.[A-Z]$", target) or importlib.util.find_spec(target) is None:
                        continue  # a placeholder, or reported by test_python_m_modules_import
                elif re.fullmatch(r"scripts/[\w/]+\.py", tokens[i + 1]) and (ROOT / tokens[i + 1]).exists():
                    target, rest = tokens[i + 1], tokens[i + 2:]
                else:
                    continue
                if target not in parsers:
                    parsers[target] = (captured_parser(path=ROOT / target) if target.endswith(".py")
                                       else captured_parser(module=target))
                accepted = options(parsers[target], [t for t in rest if not t.startswith("-")])
                for flag in long_flags(rest):
                    checked += 1
                    if flag not in accepted:
                        problems.append(f"{rel(page)}:{number}: {target} {flag}: not an option of its parser")
    assert checked > 50, f"only {checked} flags found: is the command parsing broken?"
    assert not problems, "\n".join(problems)


def test_flags_of_bash_scripts_that_refuse_unknown_arguments():
    problems = []
    for page in PAGES:
        for number, tokens in commands(page):
            for i, token in enumerate(tokens[:-1]):
                script = ROOT / tokens[i + 1]
                if token != "bash" or not tokens[i + 1].startswith("scripts/") or not script.exists():
                    continue
                text = script.read_text()
                if "unknown argument" not in text:
                    continue  # passes extra flags through (to train_mem.py, pytest, ...)
                labels = set(re.findall(r"^\s*((?:-[\w-]+\|?)+)\)", text, re.M))
                accepted = {name for label in labels for name in label.split("|")}
                for flag in long_flags(tokens[i + 2:]):
                    if flag not in accepted:
                        problems.append(f"{rel(page)}:{number}: {tokens[i + 1]} {flag}: not one of its arguments")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_pages_are_short_enough(page):
    limit = 250 if page.name == "README.md" else 500
    lines = page.read_text().count("\n")
    assert lines <= limit, f"{rel(page)}: {lines} lines (at most {limit}): split it"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    missing = [rel(page) for page in PAGES[1:] if f"]({rel(page)}" not in readme]
    assert not missing, f"README.md does not link {missing}"
