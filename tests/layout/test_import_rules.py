"""What may import what (docs/architecture.md), checked by reading every module's imports.

Lazy imports inside functions count as much as those at the top: they are the same
dependency, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "comms_tasks"
# What every part may use: settings, the database, tables, contracts, the pure rules,
# one message's rendering and delivery, and the Celery app.
FOUNDATION = frozenset(
    {
        "settings",
        "database_urls",
        "db",
        "migrate",
        "local_time",
        "task_names",
        "task_starts",
        "task_outcomes",
        "models",
        "contracts",
        "rules",
        "mail",
        "app",
    }
)
# Each stage, and the stages it may import besides itself and the foundation: the order
# of the pipeline, so that no two stages import each other.
STAGES: dict[str, frozenset[str]] = {
    "events": frozenset(),
    "inbound": frozenset({"events"}),
    "emails": frozenset({"events", "inbound"}),
    "calls": frozenset({"events", "inbound", "emails"}),
    "mailbox": frozenset({"events", "inbound", "emails", "calls"}),
    "privacy": frozenset({"events", "inbound", "emails", "calls", "mailbox"}),
    "projections": frozenset({"events", "inbound", "emails", "calls", "mailbox", "privacy"}),
    # Process hooks: they count deliveries (inbound) and redact task reprs (privacy).
    "worker": frozenset({"events", "inbound", "privacy"}),
}
# Wiring: the table of every stage's appliers.
WIRING = frozenset({"appliers"})
OPERATOR_ONLY = ("cli", "ops")


def part_of(module: str) -> str:
    """``comms_tasks.emails.answers`` -> ``emails``; ``comms_tasks`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``comms_tasks`` module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "comms_tasks" or name.startswith("comms_tasks.")}


def modules() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in graph.items():
        own = part_of(module)
        for target in sorted(name for name in imported if is_module(name)):
            other = part_of(target)
            if other in ("", own):
                continue
            if other in OPERATOR_ONLY and own not in OPERATOR_ONLY:
                found.append(f"{module} imports {target}: only the comms command uses {other}/")
            elif other == "ops" and own == "ops":
                continue
            elif own == "ops" and other == "cli":
                found.append(f"{module} imports {target}: nothing imports cli/")
            elif own in OPERATOR_ONLY or own in WIRING:
                continue
            elif own in FOUNDATION and other not in FOUNDATION:
                if not (own == "app" and other == "worker"):  # the app loads its hooks
                    found.append(f"{module} imports {target}: {own} is below every stage")
            elif own in STAGES and other not in FOUNDATION and other not in STAGES[own]:
                found.append(f"{module} imports {target}: {own} comes before {other}")
            if (
                target.endswith(".tasks")
                and not module.endswith(".tasks")
                and own not in (*OPERATOR_ONLY, *WIRING, "app")
            ):
                found.append(f"{module} imports {target}: only tasks modules start tasks")
    return found


def test_every_module_keeps_the_import_rules() -> None:
    assert violations(modules()) == []


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("comms_tasks.emails.answers", "comms_tasks.cli.shared"),
        ("comms_tasks.calls.scheduling", "comms_tasks.ops.reports"),
        ("comms_tasks.emails.weekly", "comms_tasks.calls.follow_up"),
        ("comms_tasks.rules.batching", "comms_tasks.emails.composing"),
        ("comms_tasks.mailbox.apply", "comms_tasks.calls.tasks"),
    ],
)
def test_the_rules_catch_a_stage_importing_what_it_may_not(module: str, target: str) -> None:
    graph = modules()
    graph[module] = {*graph[module], target}
    assert any(line.startswith(f"{module} imports {target}") for line in violations(graph))


def test_no_two_modules_share_a_name_and_there_is_no_tasks_folder() -> None:
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = path.parent.name if path.name == "__init__.py" else path.stem
        if path.name in ("__init__.py", "tasks.py") and path.parent == PACKAGE:
            continue
        if path.name == "tasks.py":
            continue
        names.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
    assert not (PACKAGE / "tasks").exists()


def test_beat_schedules_only_tasks_that_have_a_name_in_task_names() -> None:
    """``schedules`` is loaded by the app itself and so cannot import ``comms_tasks``: its
    task names are written out, and must be the ones of ``task_names``."""
    import schedules
    from comms_tasks import task_names

    names = {value for key, value in vars(task_names).items() if key.isupper()}
    scheduled = {entry["task"] for entry in schedules.beat_schedule.values()}
    assert scheduled and scheduled <= names


def test_the_app_loads_every_process_hook() -> None:
    """The worker's hooks register themselves when imported: the app must import each."""
    hooks = {"censored_conf", "flower_guard", "logs", "task_runs"}
    imported = imports_of(PACKAGE / "app.py")
    assert {f"comms_tasks.worker.{hook}" for hook in hooks} <= imported


def test_every_import_of_the_package_resolves() -> None:
    """Lazy imports too (mypy is told to ignore missing modules, so it would not see one
    that moved): every ``from comms_tasks... import name`` names a module and a name that
    exist."""
    import importlib

    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if not node.module.startswith("comms_tasks"):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                missing.append(f"{module_name(path)}: {node.module}")
                continue
            for alias in node.names:
                if hasattr(module, alias.name) or is_module(f"{node.module}.{alias.name}"):
                    continue
                missing.append(f"{module_name(path)}: {node.module}.{alias.name}")
    assert missing == []


def test_task_names_come_from_task_names_only() -> None:
    """Every ``comms.*`` name is defined once, in ``task_names``, and imported from there."""
    from comms_tasks import task_names

    names = {key for key in vars(task_names) if key.isupper()}
    elsewhere = []
    roots = (PACKAGE, PACKAGE.parent / "tests", PACKAGE.parent / "bench")
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        if path == PACKAGE / "task_names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "comms_tasks.task_names":
                elsewhere += [f"{path}: {a.name}" for a in node.names if a.name in names]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                value = node.value
                if isinstance(value, ast.Constant) and str(value.value).startswith("comms."):
                    elsewhere += [f"{path}: {t} = {value.value!r}" for t in targets if t in names]
    assert elsewhere == []


def test_no_module_of_the_package_is_over_400_lines() -> None:
    """A module a reader can hold in mind: past 400 lines it is split by what it does."""
    long = {
        str(path.relative_to(PACKAGE)): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}
