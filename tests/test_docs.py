"""The documentation as a reader relies on it: its commands run, its links lead somewhere, its references are current.

Every check reads the files and the parser only: nothing imports torch or Ray, and no command is run.
"""

import ast
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from galaxy_tune.cli import build_parser, subparsers

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "results" / "README.md",
               *(ROOT / "docs").rglob("*.md")])
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*python -m galaxy_tune(?= |$)(.*)")
INLINE = re.compile(r"`(python -m galaxy_tune(?: [^`]*)?)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def documented_commands(path: Path) -> list[tuple[str, str]]:
    """(place, command line) of every `python -m galaxy_tune ...`: whole lines of code blocks, with their
    continuations joined, and inline code spans of the prose."""
    found, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            found += [(where(path, number), span) for span in INLINE.findall(line)]
            continue
        if not pending:
            start = number
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        match = COMMAND.match(pending)
        if match:
            found.append((where(path, start), "python -m galaxy_tune" + match.group(1)))
        pending = ""
    return found


def galaxy_tune_argv(command: str) -> list[str]:
    """The arguments after `python -m galaxy_tune`, up to a shell comment, pipe, redirection or `;` / `&&`."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)[3:]
    argv = []
    for token in tokens:
        if set(token) <= set("();<>|&"):
            if token.startswith((">", "<")) and argv and argv[-1].isdigit():
                argv.pop()  # the 2 of 2>&1
            break
        argv.append(token)
    return argv


def test_every_command_in_the_docs_parses():
    commands = [found for path in DOCS for found in documented_commands(path)]
    assert len(commands) >= 30, "the scan found too few commands: check documented_commands"
    parser = build_parser()
    wrong = []
    for place, command in commands:
        argv = galaxy_tune_argv(command)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                parser.parse_args(argv)
            except SystemExit as exit_:
                if exit_.code != 0:  # 0: --help, which parsed
                    wrong.append(f"{place}: `{command}`: {err.getvalue().strip().splitlines()[-1]}")
    assert not wrong, "\n".join(wrong)


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces as dashes."""
    anchors, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_in_the_docs_resolves():
    wrong, checked = [], 0
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for target in (a or b for a, b in LINK.findall(line)):
                if re.match(r"[a-z]+:", target):
                    continue  # https:, mailto:
                file, _, anchor = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                checked += 1
                if not linked.exists():
                    wrong.append(f"{where(path, number)}: {target}: no such file")
                elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                    wrong.append(f"{where(path, number)}: {target}: no such heading")
    assert checked >= 50 and not wrong, "\n".join(wrong)


def load_cli_reference_script():
    spec = importlib.util.spec_from_file_location("make_cli_reference", ROOT / "docs/reference/make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_what_the_parser_prints():
    script = load_cli_reference_script()
    committed, current = script.PAGE.read_text(), script.render()
    # Compared word by word: argparse of another Python version may wrap lines differently, not say other things.
    assert committed.split() == current.split(), \
        f"docs/reference/cli.md is out of date: regenerate it with `{script.COMMAND}`"
    commands = {" ".join(words) for words, _ in subparsers(build_parser())}
    assert all(f"## {command}\n" in committed for command in commands)


def test_the_docs_hold_no_paths_of_a_development_machine():
    committed = [*DOCS, *(ROOT / "docs").rglob("*.json")]
    wrong = [f"{where(path, n)}: {line.strip()[:80]}" for path in committed
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"(?<![\w.])/(tmp|home|work|Users)/", line)]
    assert not wrong, "\n".join(wrong)


def api_keywords() -> dict[str, set[str]]:
    """Each API function's parameter names, read from galaxy_tune/api.py's source (no import of its libraries)."""
    tree = ast.parse((ROOT / "galaxy_tune" / "api.py").read_text())
    return {node.name: {a.arg for a in [*node.args.args, *node.args.kwonlyargs]}
            for node in tree.body if isinstance(node, ast.FunctionDef)
            and node.name in ("prepare", "search", "retrain", "predict")}


def test_the_python_api_page_maps_every_flag_to_its_keyword():
    rows = re.findall(r"^\| `(--[\w-]+)` \| `(\w+)(?:=False)?` \| ([\w, ]+) \|$",
                      (ROOT / "docs/reference/python-api.md").read_text(), re.M)
    renamed = {(command.strip(), flag): keyword for flag, keyword, commands in rows for command in commands.split(",")}
    assert renamed, "the flags-and-keywords table of python-api.md was not found"
    keywords = api_keywords()
    commands = dict((words[0], parser) for words, parser in subparsers(build_parser()) if words[0] in keywords)
    for command, parser in commands.items():
        from_flags = set()
        for action in parser._actions:
            if action.dest in ("help", "debug"):
                continue
            flag = next((o for o in action.option_strings if o.startswith("--")), action.dest)
            from_flags.add(renamed.get((command, flag), flag.lstrip("-").replace("-", "_")))
        assert from_flags == keywords[command], (command, from_flags ^ keywords[command])


def hyperparameter_cell(spec) -> str:
    """How hyperparameters.md writes a space's entry for a parameter."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str) and ("," in v or not v):
            return f'"{v}"'
        if isinstance(v, float):
            return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{v:g}")
        if isinstance(v, list):
            return " or ".join(map(value, v))
        return str(v)

    if spec is None:
        return "–"
    if not isinstance(spec, dict):
        return f"fixed at {value(spec)}"
    if spec["type"] == "categorical":
        cell = "one of " + ", ".join(map(value, spec["choices"]))
    else:
        kind = {"loguniform": "log-uniform", "uniform": "uniform", "int": "integer"}[spec["type"]]
        cell = f"{kind} {value(spec['low'])} – {value(spec['high'])}"
    return cell + "".join(f", when {other} is {value(v)}" for other, v in spec.get("when", {}).items())


def test_the_hyperparameter_table_matches_the_shipped_spaces_and_defaults():
    train = ast.parse((ROOT / "galaxy_tune" / "train_config.py").read_text())
    config = next(n for n in train.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    defaults = {n.target.id: ast.literal_eval(n.value) for n in config.body if isinstance(n, ast.AnnAssign)}
    spaces = {m: yaml.safe_load((ROOT / "search_spaces" / f"{m}.yaml").read_text())["params"] for m in ("full", "lora")}
    rows = {cells[0].strip("` "): [c.strip() for c in cells[2:5]]
            for line in (ROOT / "docs/reference/hyperparameters.md").read_text().splitlines()
            if line.startswith("| `") and len(cells := line.strip("|").split(" | ")) == 5}
    assert set(rows) == set(defaults) - {"method", "seed"}  # those two are set by the command, not by a space
    for name, cells in rows.items():
        expected = [hyperparameter_cell(spaces["full"].get(name)), hyperparameter_cell(spaces["lora"].get(name)),
                    hyperparameter_cell(defaults[name]).removeprefix("fixed at ")]
        assert cells == expected, name
