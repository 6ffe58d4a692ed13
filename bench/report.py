"""The results: a table on stdout and a RESULTS.md with the command and the machine."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gunicorn", "Flask", "Werkzeug", "pillow", "pillow-heif", "redis", "requests")
GUNICORN_SETTINGS = (
    "workers",
    "threads",
    "worker_class",
    "timeout",
    "keepalive",
    "max_requests",
    "max_requests_jitter",
    "preload_app",
)


@dataclass
class Row:
    """One line of the table, and what the reader should know about how it was measured."""

    label: str
    service: str
    baseline: str
    ratio: str
    goal: str
    holds: bool | None  # None: reported, no goal
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The holds? column."""
        return {True: "yes", False: "**no**", None: "—"}[self.holds]


def failed_row(label: str, error: BaseException) -> Row:
    """A row whose measurement failed: the harness says so instead of a number."""
    return Row(label, "error", "—", "—", "—", None, [f"failed: {type(error).__name__}: {error}"])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the libraries on the request path."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def command_output(command: list[str]) -> str:
    """The first line a command prints, or a short reason it could not run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({type(error).__name__})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout else "unavailable"


def gunicorn_settings(overrides: dict[str, str]) -> dict[str, object]:
    """What gunicorn.conf.py resolves to under these environment overrides (in a child).

    A setting that is a class (the worker class) is shown by its name.
    """
    code = (
        "import json, runpy; ns = runpy.run_path('gunicorn.conf.py'); "
        f"print(json.dumps({{k: ns.get(k) for k in {GUNICORN_SETTINGS!r}}}, "
        "default=lambda value: getattr(value, '__name__', repr(value))))"
    )
    with tempfile.TemporaryDirectory(prefix="bench-conf-") as folder:
        env = {"PATH": os.environ.get("PATH", ""), "PROMETHEUS_MULTIPROC_DIR": folder, **overrides}
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=env,
            check=True,
        )
    settings: dict[str, object] = json.loads(done.stdout)
    return settings


MEASURED_CODE = ("app.py", "nutrition.py")  # the modules whose code the rows time


def source_fingerprint() -> str:
    """The commit and a digest of each measured module, so a result names the code it measured."""
    commit = command_output(["git", "rev-parse", "--short", "HEAD"])
    parts = [f"commit {commit}"]
    for name in MEASURED_CODE:
        dirty = command_output(["git", "status", "--porcelain", "--", name])
        state = (
            "modified in the working tree" if dirty and dirty != "unavailable" else "as committed"
        )
        parts.append(f"{name} {state} (sha256 {code_digest(name)})")
    return ", ".join(parts)


def code_digest(name: str = "app.py") -> str:
    """A short digest of one module of the repository as it is now."""
    path = ROOT / name
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"


def app_digest() -> str:
    """A short digest of every measured module as it is now (app.py first)."""
    return " ".join(code_digest(name) for name in MEASURED_CODE)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews every number)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_lines(
    gunicorn: dict[str, dict[str, object]],
    load_average: str,
    workers_running: dict[str, int] | None = None,
) -> list[str]:
    """The machine, interpreter, libraries and gunicorn settings, one bullet each.

    `gunicorn` is what gunicorn.conf.py resolves to in the gunicorns' environment;
    `workers_running` counts each started gunicorn's worker processes once it was ready.
    """
    versions = ", ".join(f"{name} {version}" for name, version in package_versions().items())
    lines = [
        f"- CPU: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({sys.executable})",
        f"- Libraries: {versions}",
        f"- Redis: {command_output(['redis-server', '--version'])}",
        f"- Load average when the run started: {load_average}",
    ]
    for name, settings in gunicorn.items():
        described = ", ".join(f"{key}={value}" for key, value in settings.items())
        lines.append(f"- gunicorn {name}: {described}")
    if workers_running:
        seen = ", ".join(f"{name} {count}" for name, count in workers_running.items())
        lines.append(f"- gunicorn worker processes running once ready (from /proc): {seen}")
    return lines


def text_table(rows: list[Row]) -> str:
    """The table for the terminal."""
    header = ("row", "service", "baseline", "ratio", "goal", "holds?")
    cells = [header] + [
        (row.label, row.service, row.baseline, row.ratio, row.goal, row.verdict.strip("*"))
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The table for the results file."""
    lines = ["| row | service | baseline | ratio | goal | holds? |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = (row.label, row.service, row.baseline, row.ratio, row.goal, row.verdict)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def goal_summary(rows: list[Row]) -> list[str]:
    """Which goals hold and which do not, with the numbers."""
    lines = []
    for row in rows:
        if row.holds is None:
            continue
        state = "holds" if row.holds else "does NOT hold"
        lines.append(
            f"- {row.label}: {state} ({row.ratio}; goal {row.goal}; "
            f"service {row.service}, baseline {row.baseline})"
        )
    return lines or ["- no goal was measured in this run"]


@dataclass
class Report:
    """Everything the results file says."""

    command: str
    started: str
    seconds: float
    quick: bool
    model_delay: float
    fingerprint: str
    machine: list[str]
    rows: list[Row]
    caveats: list[str]
    goal_notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The whole results file."""
        kind = "quick smoke run (small samples; not representative)" if self.quick else "full run"
        parts = [
            "# Image Service: benchmark results",
            "",
            f"- Date: {self.started}; {kind}; took {self.seconds:.0f} s",
            f"- Command: `{self.command}`",
            "- How each row is measured, and the caveats: `bench/README.md`",
            f"- Code: {self.fingerprint}",
            f"- Model: loopback Chat Completions server answering after {self.model_delay:g} s",
            "",
            "## Machine",
            "",
            *self.machine,
            "",
            "## Results",
            "",
            markdown_table(self.rows),
            "",
            "## Goals",
            "",
            *goal_summary(self.rows),
            "",
            *[line for note in self.goal_notes for line in (note, "")],
            "## Figures behind each row",
            "",
        ]
        for row in self.rows:
            if row.notes:
                parts.append(f"**{row.label}**")
                parts.append("")
                parts.extend(f"- {note}" for note in row.notes)
                parts.append("")
        parts += ["## Caveats", "", *(f"- {caveat}" for caveat in self.caveats), ""]
        return "\n".join(parts)
