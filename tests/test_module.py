"""The module itself: importing it builds nothing, and its documents list what it does."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app import Config, ErrorCode

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Imports app in a clean interpreter, recording every file opened and the root logger's state.
IMPORT_PROBE = """
import json, logging, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
root = logging.getLogger()
before = [root.level, [repr(handler) for handler in root.handlers], list(root.filters)]
import app
after = [root.level, [repr(handler) for handler in root.handlers], list(root.filters)]
print(json.dumps({"opened": opened, "before": before, "after": after}))
"""


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run Python code from the repository root with exactly this environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_app_with_an_empty_environment_prints_nothing() -> None:
    result = run_python("import app", {})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


def test_importing_app_reads_no_secret_file_and_leaves_the_root_logger(tmp_path: Path) -> None:
    for name in ("jwt_secret", "openai_api_key", "redis_password", "jwt_public_key"):
        (tmp_path / name).write_text("value\n", encoding="utf-8")
    result = run_python(IMPORT_PROBE, {"SECRETS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [path for path in report["opened"] if path.startswith(str(tmp_path))] == []
    assert [path for path in report["opened"] if "/run/secrets" in path] == []
    assert report["after"] == report["before"]


def test_the_app_attribute_is_built_on_first_use(tmp_path: Path) -> None:
    code = "import app, flask; print(isinstance(app.app, flask.Flask), app.app is app.app)"
    result = run_python(code, {"SECRETS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True True")


# ------------------------------------------------------------------ the README's tables


def table_after(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after a heading, as lists of cell texts."""
    section = README.split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def shown_default(value: object) -> str:
    """A default as the configuration table shows it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{','.join(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def readme_settings() -> dict[str, str]:
    """Each variable of the README's configuration table with its default cell."""
    found = {}
    for variable_cell, default, *_ in table_after("## Configuration"):
        for variable in re.findall(r"`([A-Z0-9_]+)`", variable_cell):
            found[variable] = default
    return found


def declared_settings() -> dict[str, str]:
    """Each declared setting's variable with its default as the table should show it."""
    fields = Config.__dataclass_fields__
    return {
        setting.variable: setting.shown or shown_default(fields[name].default)
        for name, setting in Config.settings().items()
    }


def test_the_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    assert readme_settings() == declared_settings()


# ------------------------------------------------------------------ error codes


def readme_error_codes() -> set[str]:
    """The codes of the README's error table."""
    codes = set()
    for _status, code_cell, *_ in table_after("## Errors"):
        codes.update(re.findall(r"`([a-z_]+)`", code_cell))
    return codes


def openapi_error_codes() -> set[str]:
    """Every code openapi.yaml says an error response can carry."""
    document = yaml.safe_load((ROOT / "openapi.yaml").read_text(encoding="utf-8"))
    codes: set[str] = set()

    def collect(node: object, under_code: bool = False) -> None:
        if isinstance(node, dict):
            if under_code:
                codes.update(node.get("enum", []))
                if "const" in node:
                    codes.add(node["const"])
            for key, value in node.items():
                collect(value, key == "code")
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(document["components"])
    return codes


def test_the_readme_error_table_lists_every_code() -> None:
    assert readme_error_codes() == {code.value for code in ErrorCode}


def test_openapi_lists_every_code() -> None:
    assert openapi_error_codes() == {code.value for code in ErrorCode}


# ------------------------------------------------------------------ How it works


def test_every_function_how_it_works_names_exists() -> None:
    import app

    section = README.split("\n## How it works\n", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. \*\*[^*]+\*\* \(([^)]*)\)", section, re.MULTILINE)
    functions = re.findall(r"`([A-Za-z_.]+)`", " ".join(steps))
    assert len(steps) == 10
    assert len(functions) >= 15
    for name in functions:
        first, *rest = name.split(".")
        # ``locks.SingleFlight.run`` names a module beside app.py; a bare name is app.py's.
        if (ROOT / f"{first}.py").is_file():
            target: object = importlib.import_module(first)
        else:
            target, rest = app, [first, *rest]
        for part in rest:
            assert hasattr(target, part), f"How it works names {name}, which is not there"
            target = getattr(target, part)
        assert callable(target), name


# ------------------------------------------------------------------ Flask in app.py alone

# Every top-level module but app.py and gunicorn's configuration, found anew each run.
FLASK_FREE_MODULES = sorted(
    path.name for path in ROOT.glob("*.py") if path.name not in {"app.py", "gunicorn.conf.py"}
)
# Where importing app is expected: the tests, the bench, the tools and gunicorn's configuration.
APP_IMPORTERS = ("tests", "bench", "tools", "gunicorn.conf.py")


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", FLASK_FREE_MODULES)
def test_the_modules_beside_app_import_neither_flask_nor_app(module: str) -> None:
    imported = imported_modules(ROOT / module)
    assert not imported & {"flask", "flask_cors", "werkzeug", "app"}, module


@pytest.mark.parametrize("module", FLASK_FREE_MODULES)
def test_how_it_works_lists_every_module_beside_app_with_its_line_count(module: str) -> None:
    section = README.split("\n## How it works\n", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"^- `{re.escape(module)}` \(\d+ lines\): ", section, re.MULTILINE), module


def test_nothing_imports_app_but_the_tests_bench_tools_and_gunicorn() -> None:
    importers = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {".venv", ".git"} or relative.parts[0] in APP_IMPORTERS:
            continue
        if path.name != "app.py" and "app" in imported_modules(path):
            importers.append(str(relative))
    assert not importers


# ------------------------------------------------------------------ app.py in reading order

BANNER = re.compile(r"^# -{20,}\n# (?P<title>[^\n]+)\n# -{20,}\n", re.MULTILINE)
# The sections that come last and use everything.
LAST_SECTIONS = ("Routes", "Request lifecycle", "Application factory")


def defined_names(node: ast.stmt) -> set[str]:
    """The module-level names one top-level statement binds."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    return {
        name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)
    }


def used_names(node: ast.stmt) -> set[str]:
    """Every name a top-level statement reads, in its body, annotations or value."""
    return {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}


def app_sections() -> list[tuple[str, list[ast.stmt]]]:
    """app.py's top-level statements grouped under the banner comment above them."""
    source = (ROOT / "app.py").read_text(encoding="utf-8")
    banners = [
        (source.count("\n", 0, match.start()) + 1, match["title"])
        for match in BANNER.finditer(source)
    ]
    sections: list[tuple[str, list[ast.stmt]]] = [("Imports", [])]
    sections += [(title, []) for _, title in banners]
    for node in ast.parse(source).body:
        index = sum(1 for line, _ in banners if line < node.lineno)
        sections[index][1].append(node)
    return sections


def test_app_reads_in_order_no_section_uses_a_name_a_later_section_defines() -> None:
    sections = app_sections()
    defined_in = {}
    for index, (_, nodes) in enumerate(sections):
        for node in nodes:
            for name in defined_names(node):
                defined_in.setdefault(name, index)
    forward = []
    for index, (title, nodes) in enumerate(sections):
        if title.startswith(LAST_SECTIONS):
            continue
        for node in nodes:
            for name in sorted(used_names(node) - defined_names(node)):
                later = defined_in.get(name, -1)
                if later > index:
                    forward.append(f"{title} uses {name} from {sections[later][0]}")
    assert [title for title, _ in sections][-3:][0].startswith("Routes")
    assert not forward
