"""Every code block in README.md and docs/*.md runs, or is checked, as written.

What happens to a block depends on its fence language and on an optional marker, an HTML comment on
the line directly before the fence:

- ```python``` without a marker is executed in a fresh namespace, in a scratch folder.
- ``<!-- test: digits -->`` before a python block: executed in a namespace that already holds a small
  digits setup (``torch``, ``F``, ``stepaudit``, ``model``, ``optimizer``/``opt``, ``loss_fn``, ``x``,
  ``y``, ``x_test``, ``y_test``, ``batches``, ``batch``, ``loader``, ``scheduler`` and, unless the block
  makes its own, ``audit``). An ``Audit`` the block leaves open then audits two steps and is closed.
- ``<!-- test: compile (why) -->``: compiled, not run (it needs the reader's model, data or runs).
- ``<!-- test: doctor-script NAME -->`` before a python block: written to NAME; ``stepaudit doctor
  --json --no-store NAME`` runs on it. ``<!-- test: doctor-output NAME -->`` before a text block (the
  readable output) and ``<!-- test: doctor-json NAME -->`` before a json block: the codes they show
  must be the ones the doctor finds now, in the same order, and the JSON must have the same keys.
- ```bash``` / ```console``` / ```sh```: shell commands, checked without running them (in console
  blocks only the ``$ `` lines): ``stepaudit SUB`` must be a command and every ``--option`` must be in
  ``stepaudit SUB --help``; ``python -m MODULE`` must be importable; ``python FILE`` / ``bash FILE``
  must exist; ``make TARGET`` must be a Makefile target; ``pip install 'stepaudit[EXTRA]'`` must name a
  declared extra. Other commands (``pip install torch``) are not checked.
- ```json```: must parse.
- ```text```: an output sample, not run; ``<!-- test: output (what) -->`` says where it comes from.
  ``<!-- explain-output: ARGS -->`` blocks are compared with the real output by
  ``tests/explain/explain_docs_test.py``.
- A block without a language is allowed only in docs/design.md and docs/doctor_suite.md (diagrams and
  listings); elsewhere it fails: give it one of the languages above.

Also checked: README.md is at most 12 KB, and every relative link in README.md and docs/*.md points to
a file that exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import stepaudit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
UNMARKED_ALLOWED = {"design.md", "doctor_suite.md"}  # kept as they are: their bare blocks are listings
MARKER = re.compile(r"^<!--\s*test:\s*([\w-]+)\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```([\w-]*)\s*$")
SHELL = {"bash", "console", "sh", "shell"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str | None  # "digits", "compile", "doctor-script", ... or None
    arg: str
    source: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"{page.name}:{i + 1}: a code block is never closed"
        previous = lines[i - 1].strip() if i else ""
        marker = MARKER.match(previous)
        kind, arg = (marker.group(1), marker.group(2)) if marker else (None, "")
        if previous.startswith("<!-- explain-output:"):
            kind, arg = "explain-output", previous
        found.append(Block(page, i + 1, match.group(1), kind, arg, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return found


ALL = [block for page in PAGES for block in blocks_of(page)]


def _ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


# -- the setups python blocks run in ----------------------------------------------------------------------


def digits_namespace(tmp_path: Path, source: str) -> dict:
    import torch
    import torch.nn.functional as F

    import stepaudit
    from stepaudit.workloads import classification_loss, load_digits, minibatches, mlp

    torch.manual_seed(0)
    x, y, x_test, y_test = load_digits()
    model = mlp((64, 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = minibatches(x, y, batch_size=32)
    namespace = {
        "torch": torch,
        "F": F,
        "stepaudit": stepaudit,
        "model": model,
        "optimizer": optimizer,
        "opt": optimizer,
        "loss_fn": classification_loss,
        "x": x,
        "y": y,
        "x_test": x_test[:64],
        "y_test": y_test[:64],
        "batches": batches,
        "batch": next(batches),
        "loader": [next(batches) for _ in range(3)],
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=10),
    }
    if not re.search(r"^\s*audit\s*=", source, flags=re.M):
        namespace["audit"] = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "fixture")
    return namespace


def run_python(block: Block, namespace: dict) -> dict:
    code = compile(block.source, block.where, "exec")
    name = namespace.get("__name__", "__docs__")
    sys.modules.setdefault(name, types.ModuleType(name))  # a @dataclass in a block looks its module up
    exec(code, namespace)  # noqa: S102 - our own documentation
    return namespace


# -- python blocks -----------------------------------------------------------------------------------------

PYTHON = [b for b in ALL if b.lang == "python" and b.marker not in ("doctor-script", "output")]


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block(block: Block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert block.marker in (None, "digits", "compile"), f"{block.where}: unknown marker {block.marker!r}"
    if block.marker == "compile":
        compile(block.source, block.where, "exec")
        return
    if block.marker is None:
        run_python(block, {"__name__": "__docs__"})
        return
    import stepaudit

    namespace = run_python(block, digits_namespace(tmp_path, block.source))
    audit = namespace.get("audit")
    if isinstance(audit, stepaudit.Audit) and ".close()" not in block.source:
        for _ in range(2):
            audit.step(namespace["batch"])
        assert audit.records, f"{block.where}: the audit recorded nothing"
        audit.close()


def test_readme_quickstart_writes_the_run(tmp_path, monkeypatch, capsys):
    """The README's Audit example trains 100 audited steps, stores them and prints the verdicts."""
    example = next(b for b in blocks_of(README) if b.lang == "python" and "stepaudit.Audit(" in b.source)
    monkeypatch.chdir(tmp_path)
    run_python(example, {"__name__": "__docs__"})
    assert len(stepaudit.load(tmp_path / "runs" / "momentum")) == 100
    printed = capsys.readouterr().out.split()
    at = next(i for i, b in enumerate(blocks_of(README)) if b is example or b.source == example.source)
    shown = blocks_of(README)[at + 1].source.split()  # the output block right under the example
    assert len(shown) == len(printed) and [w for w in shown if not _number(w)] == [w for w in printed if not _number(w)]
    for a, b in zip(shown, printed):  # numbers as documented, up to float32 summation order (threads, BLAS)
        if _number(a):
            assert float(a) == pytest.approx(float(b), rel=0.05, abs=0.011), (shown, printed)


def _number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


# -- the doctor's documented output ----------------------------------------------------------------------

_DOCTOR_RESULTS: dict[str, dict] = {}


def doctor_json(script: str, tmp_path: Path) -> dict:
    """``stepaudit doctor --json --no-store`` on a documented script (cached per script text)."""
    if script not in _DOCTOR_RESULTS:
        path = tmp_path / "train.py"
        path.write_text(script, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "stepaudit", "doctor", "--json", "--no-store", path.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        _DOCTOR_RESULTS[script] = json.loads(done.stdout)
    return _DOCTOR_RESULTS[script]


def _doctor_pairs() -> list[tuple[Block, Block]]:
    pairs = []
    for page in PAGES:
        blocks = blocks_of(page)
        scripts = {b.arg: b for b in blocks if b.marker == "doctor-script"}
        for block in blocks:
            if block.marker in ("doctor-output", "doctor-json"):
                assert block.arg in scripts, f"{block.where}: no doctor-script {block.arg} on this page"
                pairs.append((scripts[block.arg], block))
    return pairs


DOCTOR = _doctor_pairs()


@pytest.mark.parametrize("script, shown", DOCTOR, ids=[b.where for _, b in DOCTOR])
def test_documented_doctor_output_is_what_it_finds(script, shown, tmp_path):
    result = doctor_json(script.source, tmp_path)
    found = [d["code"] for d in result["diagnoses"]]
    if shown.marker == "doctor-json":
        documented = json.loads(shown.source)
        assert set(documented) == set(result), f"{shown.where}: the JSON fields changed: {sorted(result)}"
        assert [d["code"] for d in documented["diagnoses"]] == found, f"{shown.where}: the doctor now finds {found}"
        for entry, real in zip(documented["diagnoses"], result["diagnoses"]):
            assert set(entry) == set(real), f"{shown.where}: a diagnosis now has {sorted(real)}"
        return
    root = re.search(r"most likely root cause: (\w+)", shown.source)
    also = re.findall(r"^\s+[✗!·i]\s+(\w+) \(", shown.source, flags=re.M)
    shown_codes = ([root.group(1)] if root else []) + also
    assert shown_codes == found, f"{shown.where}: the documented output shows {shown_codes}, the doctor finds {found}"


# -- shell commands ----------------------------------------------------------------------------------------

_HELP: dict[tuple[str, ...], str] = {}


def _help(command: tuple[str, ...]) -> str:
    if command not in _HELP:
        from stepaudit.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*command, "--help"])
        _HELP[command] = out.getvalue()
    return _HELP[command]


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w-]+):", text, flags=re.M))


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the names of the [project.optional-dependencies] table
        section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))
    return set(tomllib.loads(text)["project"]["optional-dependencies"])


def check_stepaudit(words: list[str], where: str) -> None:
    from stepaudit.cli import COMMANDS

    if not words:
        return
    sub = words[0]
    assert sub in COMMANDS or sub in ("--help", "--version"), f"{where}: no command `stepaudit {sub}`"
    options = words[1:]
    if sub == "doctor":  # what follows the script goes to the script
        script = next((i for i, w in enumerate(options) if w.endswith(".py")), len(options))
        options = options[:script]
    command = (sub, "--eos") if sub == "demo" and "--eos" in options else (sub,)
    text = _help(command)
    for word in options:
        if word.startswith("-") and word not in ("-", "--"):
            name = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), (
                f"{where}: `stepaudit {sub}` has no option {name}"
            )


def check_command(line: str, where: str) -> None:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as error:
        raise AssertionError(f"{where}: cannot parse {line!r}: {error}") from error
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value command
        words = words[1:]
    if not words:
        return
    head = words[0]
    if head == "stepaudit":
        check_stepaudit(words[1:], where)
    elif head.endswith("python") or head.endswith("python3"):
        if len(words) > 2 and words[1] == "-m":
            module = words[2]
            if module.startswith("stepaudit"):
                if module == "stepaudit.explain":
                    return
                import importlib.util

                assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        elif len(words) > 1:
            assert (ROOT / words[1]).is_file(), f"{where}: no file {words[1]}"
    elif head == "bash" and len(words) > 1:
        assert (ROOT / words[1]).is_file(), f"{where}: no file {words[1]}"
    elif head == "make":
        for target in words[1:]:
            assert target in _makefile_targets(), f"{where}: no Makefile target {target}"
    elif head == "pip" and "install" in words:
        for word in words:
            extra = re.fullmatch(r"stepaudit\[([\w,-]+)\]", word)
            if extra:
                unknown = set(extra.group(1).split(",")) - _extras()
                assert not unknown, f"{where}: pyproject.toml declares no extra {sorted(unknown)}"


SHELL_BLOCKS = [b for b in ALL if b.lang in SHELL]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_shell_block(block: Block):
    assert block.marker in (None, "output"), f"{block.where}: unknown marker {block.marker!r}"
    if block.marker == "output":
        return
    for number, line in enumerate(block.source.splitlines(), start=block.line + 1):
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        check_command(line, f"{block.page.relative_to(ROOT)}:{number}")


# -- everything else ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "json"], ids=_ids([b for b in ALL if b.lang == "json"]))
def test_json_block_parses(block: Block):
    json.loads(block.source)


def test_every_block_has_a_known_kind():
    known = {"python", "json", "text"} | SHELL
    for block in ALL:
        if block.lang == "":
            assert block.page.name in UNMARKED_ALLOWED and block.page.parent.name == "docs", (
                f"{block.where}: a code block needs a language (python, bash, console, json or text)"
            )
            continue
        assert block.lang in known, f"{block.where}: unknown block language {block.lang!r}"
        if block.marker == "output":
            assert block.arg, f"{block.where}: say where the output comes from: <!-- test: output (what) -->"


def test_readme_is_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes; move detail into docs/"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_point_to_existing_files():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files: " + ", ".join(broken)


def test_relative_link_anchors_exist():
    """``page.md#anchor`` names a heading of that page (GitHub's slugs)."""

    def slugs(page: Path) -> set[str]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        out = set()
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
            slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            out.add(slug)
        return out

    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            other = page if not path else page.parent / path
            if other.suffix == ".md" and other.exists() and anchor not in slugs(other):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing headings: " + ", ".join(broken)
