"""The code's shape: one package per program, allowed import directions, no circles, no import side effects."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import redis_url

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "worker", "trainer")
# Programs in worker/: each imports shared/ and itself, never another program.
PROGRAMS = ("worker.api", "worker.consumer", "worker.ops", "worker.pacs")
# The only module allowed to reach the trainer, and only inside a function (the demo trains a model).
TRAINER_USER = "worker.ops.demo"
# The dispatcher behind `lungcam` starts the programs, so it may import them, but only lazily.
DISPATCHER = "worker.cli"
# What every program runs on (services, follow, exit codes): not a program, so any program imports it.
RUNTIME = "worker.runtime"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the three top-level packages, by dotted name."""
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
    }


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, lazy) for every import of a project module; lazy = inside a function."""
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        lazy_nodes = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.append((name, target, id(node) in lazy_nodes))
    return edges


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_imports_follow_the_allowed_directions():
    """shared imports neither worker nor trainer; programs do not import each other; only the demo reaches the trainer."""
    problems = []
    for importer, imported, lazy in import_edges(project_modules()):
        if _in(importer, "shared") and not _in(imported, "shared"):
            problems.append(f"{importer} -> {imported}: shared/ imports nothing of worker/ or trainer/")
        if _in(importer, "trainer") and _in(imported, "worker"):
            problems.append(f"{importer} -> {imported}: the trainer does not import the serving side")
        if _in(importer, "worker") and _in(imported, "trainer") and not (importer == TRAINER_USER and lazy):
            problems.append(f"{importer} -> {imported}: only {TRAINER_USER} may import the trainer, inside a function")
        for program in PROGRAMS:
            for other in PROGRAMS:
                if other != program and _in(importer, program) and _in(imported, other):
                    problems.append(f"{importer} -> {imported}: {program} does not import {other}")
        if importer == DISPATCHER and any(_in(imported, program) for program in PROGRAMS) and not lazy:
            problems.append(f"{importer} -> {imported}: the dispatcher imports programs only when a subcommand runs")
        if importer == RUNTIME and any(_in(imported, program) for program in PROGRAMS):
            problems.append(f"{importer} -> {imported}: the runtime every program shares imports no program")
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    """No module reaches itself through imports, counting imports inside functions too."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _lazy in import_edges(project_modules()):
        graph.setdefault(importer, set()).add(imported)
    # Iterative depth-first search with colours; a grey node met again closes a circle.
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(project_modules(), WHITE)
    circles = []
    for start in colour:
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour[child] == GREY:
                circles.append(" -> ".join(path[path.index(child) :] + [child]))
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    assert not circles, "\n".join(circles)


def test_the_graph_check_sees_real_imports():
    """Guard against a checker that passes because it finds nothing."""
    edges = {(a, b) for a, b, _lazy in import_edges(project_modules())}
    assert ("worker.api.routes.scans", "shared.results") in edges
    assert ("worker.consumer.tasks", "worker.consumer.classifier") in edges
    assert ("worker.ops.demo", "trainer.train") in edges
    assert ("worker.pacs.commands", RUNTIME) in edges and ("worker.api.main", RUNTIME) in edges


_PROBE = textwrap.dedent(
    """
    import importlib, json, os, socket, subprocess, sys, threading

    # TensorFlow itself runs `uname -p` (platform.uname) when imported: that is the library's start-up,
    # not ours, so it is loaded before the guards go up. Every project module is then imported guarded.
    for library in ("tensorflow", "keras"):
        try:
            importlib.import_module(library)
        except ImportError:
            pass

    calls = []
    current = [None]

    def record(what):
        def guard(*args, **kwargs):
            calls.append([current[0], what])
            raise RuntimeError(f"{what} during import of {current[0]}")
        return guard

    socket.socket.connect = record("socket.connect")
    socket.socket.connect_ex = record("socket.connect_ex")
    socket.create_connection = record("socket.create_connection")
    subprocess.Popen.__init__ = record("subprocess.Popen")
    os.fork = record("os.fork")
    os.posix_spawn = record("os.posix_spawn")
    os.system = record("os.system")
    threads_before = set(threading.enumerate())
    errors = []
    for name in json.loads(sys.argv[1]):
        current[0] = name
        try:
            importlib.import_module(name)
        except Exception as exc:
            errors.append([name, f"{type(exc).__name__}: {exc}"])
    threads = sorted(t.name for t in set(threading.enumerate()) - threads_before)
    print(json.dumps({"calls": calls, "errors": errors, "threads": threads}))
    """
)


def _run_probe(script: str, modules: list[str], tmp_path: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LUNGCAM_")} | {
        "LUNGCAM_DATA_DIR": str(tmp_path / "data"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(modules)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_any_module_starts_no_process_and_opens_no_connection(tmp_path: Path):
    """Every module imports with sockets, subprocesses and forks forbidden, and creates no data folder."""
    report = _run_probe(_PROBE, sorted(project_modules()), tmp_path)
    assert report["errors"] == [] and report["calls"] == [], report
    # Python threads started at import would be work done before a program chose to start.
    assert not [name for name in report["threads"] if not name.startswith(("ThreadPoolExecutor", "Thread-"))], report
    assert not (tmp_path / "data").exists(), "an import created the data folder (settings read at import?)"


_WITHOUT_TENSORFLOW = (
    textwrap.dedent(
        """
    import importlib.abc, json, sys

    class NoModelStack(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: an API install has no model stack)")
            return None

    sys.meta_path.insert(0, NoModelStack())
    """
    )
    + _PROBE
)


# What the API image runs: the API itself and every operator command except the demo (which trains).
API_IMAGE_MODULES = [
    "worker.cli",
    "worker.api.main",
    "worker.ops.commands",
    "worker.ops.ingest",
    "worker.ops.report",
    "worker.ops.tables",
    "worker.runtime",
    "shared.queueing",
    "shared.results",
    "shared.sources",
    "shared.domain",
    "shared.engine",
    "shared.models",
    "shared.scans",
    "shared.store",
]


def test_the_api_and_operator_commands_import_without_tensorflow(tmp_path: Path):
    """`lungcam[api]` has no TensorFlow or Keras: the API and the operator commands must not need them."""
    report = _run_probe(_WITHOUT_TENSORFLOW, API_IMAGE_MODULES, tmp_path)
    assert report["errors"] == [] and report["calls"] == [], report


def test_an_app_is_built_from_given_settings_without_environment_or_subprocess(tmp_path: Path, monkeypatch):
    """make_app + bind_classify_task take their settings as arguments; the task runs in-process on a real database."""
    from celery_batches import SimpleRequest

    from shared.engine import make_engine, make_session_factory, migrate
    from shared.queueing import CLASSIFY_TASK, make_app
    from shared.settings import Settings
    from shared.store import LocalStore
    from worker.consumer.classifier import ScanClassifier
    from worker.consumer.tasks import bind_classify_task

    for name in [key for key in os.environ if key.startswith("LUNGCAM_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    migrate(url)
    settings = Settings(broker_url=redis_url(14), database_url=url, batch_size=5, batch_flush_ms=300)
    app = make_app(settings)
    engine = make_engine(url)
    classifier = ScanClassifier([], LocalStore(tmp_path / "store"), make_session_factory(engine), settings)
    try:
        bind_classify_task(app, classifier, settings)
        task = app.tasks[CLASSIFY_TASK]
        assert task.flush_every == 5 and task.flush_interval == pytest.approx(0.3)
        assert app.conf.broker_url == redis_url(14)
        # A message for a scan nobody submitted is skipped, not failed, and nothing is re-published.
        request = SimpleRequest(
            "id-1", CLASSIFY_TASK, ("no-such-scan",), {}, {"routing_key": "routine"}, "test", True, None, None, None
        )
        assert task.run([request]) == {"done": 0, "failed": 0, "retry": 0}
    finally:
        classifier.close()
        engine.dispose()
        app.close()


# The environment is read in one place: Settings (and the helpers beside it), plus run.py, which runs before
# the project is installed.
ENVIRONMENT_READERS = {"shared.settings", "run"}
ENVIRONMENT_NAMES = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})


def environment_uses(path: Path) -> list[int]:
    """Line numbers where a module touches the process environment through os (os.environ, os.getenv, ...)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        attribute_of_os = (
            isinstance(node, ast.Attribute)
            and node.attr in ENVIRONMENT_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )
        imported_from_os = (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in ENVIRONMENT_NAMES for alias in node.names)
        )
        if attribute_of_os or imported_from_os:
            lines.append(node.lineno)
    return lines


def test_only_settings_read_the_environment():
    """os.environ, os.getenv and os.putenv appear only in shared/settings.py (and run.py): settings are the one reader."""
    modules = {**project_modules(), "run": ROOT / "run.py"}
    allowed = ENVIRONMENT_READERS
    problems = [
        f"{path.relative_to(ROOT)}:{line}: reads or sets the environment; use shared.settings"
        for name, path in modules.items()
        if name not in allowed
        for line in environment_uses(path)
    ]
    assert not problems, "\n".join(problems)
    # The checker sees the real readers, so an empty result above means something.
    assert environment_uses(ROOT / "shared" / "settings.py") and environment_uses(ROOT / "run.py")


# Magic numbers of the formats the decoders read: only shared/imaging/ sniffs bytes.
MAGIC_BYTES = (b"\x89PNG", b"\xff\xd8\xff", b"DICM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
IMAGING_PACKAGE = "shared.imaging"


def _header_parsing(tree: ast.AST) -> list[str]:
    """What in a module sniffs bytes or parses a DICOM file: magic-byte literals, dcmread, pydicom.filereader."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            found += [f"line {node.lineno}: magic bytes {magic!r}" for magic in MAGIC_BYTES if magic in node.value]
        elif isinstance(node, ast.Attribute) and node.attr in ("dcmread", "filereader"):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id == "dcmread":
            found.append(f"line {node.lineno}: dcmread")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pydicom"):
            names = {alias.name for alias in node.names}
            if node.module.startswith("pydicom.filereader") or names & {"dcmread", "filereader"}:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("pydicom.filereader")
            ]
    return found


def test_only_the_imaging_package_sniffs_bytes_or_parses_dicom_headers():
    """One home for reading headers: shared/imaging/ (worker/pacs builds DICOM objects from parsed data sets)."""
    problems = []
    parsed_inside = 0
    for name, path in project_modules().items():
        found = _header_parsing(ast.parse(path.read_text(), str(path)))
        if _in(name, IMAGING_PACKAGE):
            parsed_inside += len(found)
        else:
            problems += [f"{name}: {what}" for what in found]
    assert not problems, "\n".join(problems)
    assert parsed_inside >= 5, "the check found no sniffing or parsing even in shared/imaging/"


# --- One home per concept: the scan repository and the scan vocabulary (issue 20) ---

# The one module that writes status, leases and stamps to the scans table.
SCAN_REPOSITORY = "shared.scans"
# The one module that defines the scan vocabulary.
VOCABULARY = "shared.domain"
VOCABULARY_NAMES = ("Priority", "Status", "SCAN_ID_PATTERN")
_SQL_MODULES = ("sa", "sqlalchemy")
_RAW_SCANS_UPDATE = re.compile(r"\bUPDATE\s+scans\b", re.IGNORECASE)


def _checked_modules() -> dict[str, Path]:
    """shared/, worker/, trainer/ (migrations excluded: they own the schema's history) and the benchmarks."""
    benchmarks = {f"benchmarks.{path.stem}": path for path in sorted((ROOT / "benchmarks").rglob("*.py"))}
    return project_modules() | benchmarks


def _is_scan_table(node: ast.expr) -> bool:
    """Scan, models.Scan, Scan.__table__ or sa.table("scans")."""
    if isinstance(node, ast.Name):
        return node.id == "Scan"
    if isinstance(node, ast.Attribute):
        return node.attr == "Scan" or (node.attr == "__table__" and _is_scan_table(node.value))
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        return name == "table" and node.args[0].value == "scans"
    return False


def _is_query_of_scans(node: ast.expr) -> bool:
    """An ORM query chain that starts at session.query(Scan...)."""
    return any(
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "query"
        and any(_is_scan_table(arg) or any(_is_scan_table(sub) for sub in ast.walk(arg)) for arg in call.args)
        for call in ast.walk(node)
    )


def _updates_scans(call: ast.Call) -> bool:
    """update(Scan) or sa.update(models.Scan) (the construct, not set.update), Scan.__table__.update(), query(Scan).update()."""
    func = call.func
    construct = (isinstance(func, ast.Name) and func.id == "update") or (
        isinstance(func, ast.Attribute)
        and func.attr == "update"
        and isinstance(func.value, ast.Name)
        and func.value.id in _SQL_MODULES
    )
    if construct:
        return bool(call.args) and _is_scan_table(call.args[0])
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "update"
        and (_is_scan_table(func.value) or _is_query_of_scans(func.value))
    )


def scans_updates(source: str) -> list[int]:
    """Lines of source that UPDATE the scans table, through SQLAlchemy or in raw SQL (docstrings aside)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    lines = {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and _updates_scans(node)}
    lines.update(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and _RAW_SCANS_UPDATE.search(node.value)
    )
    return sorted(lines)


def test_the_scans_update_check_sees_every_form():
    """Guard against a checker that passes because it recognises nothing."""
    planted = textwrap.dedent(
        """
        import sqlalchemy as sa
        from sqlalchemy import text, update
        from shared import models
        from shared.models import Scan
        session.execute(update(Scan).values(status="queued"))
        session.execute(sa.update(models.Scan).where(models.Scan.scan_id == "a").values(error=None))
        session.execute(Scan.__table__.update().values(error=None))
        session.query(Scan).filter(Scan.scan_id == "a").update({"status": "failed"})
        session.execute(text("UPDATE scans SET status = 'failed'"))
        session.execute(sa.update(sa.table("scans")).values(error=None))
        found.update(session.scalars(sa.select(Scan.scan_id)))  # a set's update: not an UPDATE
        values.update({"status": "queued"})
        """
    )
    assert scans_updates(planted) == [6, 7, 8, 9, 10, 11]
    assert len(scans_updates(_checked_modules()[SCAN_REPOSITORY].read_text())) >= 8


def test_only_the_scan_repository_updates_scans():
    """Every UPDATE of the scans table (status, leases, published_at, sources) is a named function of shared.scans."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for name, path in _checked_modules().items()
        if name != SCAN_REPOSITORY
        for line in scans_updates(path.read_text())
    ]
    assert not offenders, "UPDATE of scans outside shared/scans.py (add a function there):\n" + "\n".join(offenders)


def _defined_names(tree: ast.Module) -> list[tuple[str, int]]:
    """(name, line) of module-level and nested classes and assignments named like the vocabulary."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in VOCABULARY_NAMES:
            found.append((node.name, node.lineno))
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name) and leaf.id in VOCABULARY_NAMES:
                    found.append((leaf.id, node.lineno))
    return found


def test_the_scan_vocabulary_has_one_definition():
    """Priority, Status and the scan-id pattern are defined once (shared.domain); nobody re-spells the pattern."""
    from shared.domain import SCAN_ID_PATTERN

    core = SCAN_ID_PATTERN.pattern.strip("^$")
    definitions: dict[str, list[str]] = {name: [] for name in VOCABULARY_NAMES}
    copies = []
    for module, path in _checked_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for name, line in _defined_names(tree):
            definitions[name].append(f"{module}:{line}")
        # The pattern as a literal anywhere else (re.compile, Field(pattern=...), Path(pattern=...)).
        copies.extend(
            f"{module}:{node.lineno}"
            for node in ast.walk(tree)
            if module != VOCABULARY
            and isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and core in node.value
        )
    assert {name: places for name, places in definitions.items() if len(places) != 1} == {}, definitions
    assert all(places[0].startswith(f"{VOCABULARY}:") for places in definitions.values()), definitions
    assert not copies, "the scan-id pattern spelled again (import shared.domain.SCAN_ID_PATTERN):\n" + "\n".join(copies)


# --- Short functions (issue 20): a reader sees a whole function at once ---

MAX_FUNCTION_LINES = 80
# Argument parsers are one declaration per option: long, flat and read as a table.
LONG_FUNCTIONS_ALLOWED = {"worker.cli.build_parser", "trainer.cli.build_parser"}


def test_no_function_is_longer_than_80_lines():
    """Every function in shared/, worker/ and trainer/ fits in 80 lines, the CLI argument parsers excepted."""
    too_long = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                    too_long.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    assert not too_long, "\n".join(too_long)
