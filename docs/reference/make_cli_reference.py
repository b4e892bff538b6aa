"""Write docs/reference/cli.md: every command's --help, rendered from the parser in galaxy_tune/cli.py.

Run `python docs/reference/make_cli_reference.py` after changing a flag; tests/test_docs.py fails while the
committed page differs from what the parser gives.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = Path(__file__).resolve().parent / "cli.md"
COLUMNS = "100"  # the help's line width, fixed so the page is the same on every terminal
COMMAND = "python docs/reference/make_cli_reference.py"


def render() -> str:
    """The page: the top-level help, then each command's and each benchmark's."""
    from galaxy_tune.cli import build_parser, subparsers

    saved = {name: os.environ.get(name) for name in ("COLUMNS", "NO_COLOR")}
    os.environ.update(COLUMNS=COLUMNS, NO_COLOR="1")
    try:
        parser = build_parser()
        sections = [("python -m galaxy_tune", parser)] + [(" ".join(words), sub) for words, sub in subparsers(parser)]
        helps = [(title, sub.format_help().rstrip()) for title, sub in sections]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    lines = ["# Command line reference", "",
             f"Generated from the parser in `galaxy_tune/cli.py` by `{COMMAND}`; do not edit by hand.",
             "The Python functions behind the commands: [python-api.md](python-api.md).", "",
             "Commands: " + ", ".join(f"[{title}](#{anchor(title)})" for title, _ in helps[1:]) + ".", ""]
    for title, text in helps:
        lines += [f"## {title}", "", "```text", text, "```", ""]
    return "\n".join(lines)


def anchor(title: str) -> str:
    """The heading's anchor as GitHub makes it: `bench gpu` -> `bench-gpu`."""
    return title.lower().replace(" ", "-")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the galaxy_tune of this checkout, installed or not
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)}")
