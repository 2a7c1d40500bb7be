"""The layers of docs/architecture.md, checked on the code's own imports: every module imports only its own
layer or those below, inference/evaluation/privacy reporting never import the training package, the site
never imports the coordinator, ecgtwin/ never imports Flower, and no two packages import each other."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module belongs to the first prefix that matches it
LAYERS = [
    ("errors and device", ["ecgtwin", "ecgtwin.errors", "ecgtwin.device", "ecgtwin.compute"]),
    ("process supervision", ["ecgtwin.supervise"]),
    ("data", ["ecgtwin.data", "ecgtwin.plot"]),
    ("models", ["ecgtwin.models"]),
    ("schema and storage", ["ecgtwin.config", "ecgtwin.checkpoint", "ecgtwin.weights"]),
    ("conditioning", ["ecgtwin.text", "ecgtwin.conditioning"]),
    ("accounting", ["ecgtwin.privacy", "ecgtwin.site_folder"]),
    ("one local pass; inference", ["ecgtwin.train", "ecgtwin.twin"]),
    ("evaluation", ["ecgtwin.evaluate"]),
    ("site and coordinator", ["ecgtwin.site", "ecgtwin.audit", "ecgtwin.export", "ecgtwin.foundation",
                              "ecgtwin.coordinator"]),
    ("audits over a site", ["ecgtwin.canary"]),
    ("applications", ["ecgtwin.demo", "ecgtwin.cli"]),
]
FORBIDDEN = [  # (importer prefix, imported prefix): same or lower layer, but still not allowed
    ("ecgtwin.twin", "ecgtwin.train"), ("ecgtwin.evaluate", "ecgtwin.train"), ("ecgtwin.privacy", "ecgtwin.train"),
    ("ecgtwin.site", "ecgtwin.coordinator"), ("ecgtwin.coordinator", "ecgtwin.site"),
    ("ecgtwin.coordinator", "ecgtwin.train"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def layer(name: str) -> int | None:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, frozenset[str]]:
    return {module_name(p): frozenset(i for i in imports(p) if i.split(".")[0] == "ecgtwin")
            for p in sorted((ROOT / "ecgtwin").rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    assert [m for m in graph() if layer(m) is None] == []


def test_imports_go_only_downward() -> None:
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {i} ({LAYERS[layer(i)][0]})"
              for m, targets in graph().items() for i in targets
              if layer(i) is not None and layer(i) > layer(m)]
    assert upward == []


def test_forbidden_imports_are_absent() -> None:
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    found = [f"{m} imports {i}" for m, targets in graph().items() for i in targets
             for a, b in FORBIDDEN if under(m, a) and under(i, b)]
    assert found == []


def test_no_package_import_cycles() -> None:
    """Between the units of the layout (ecgtwin.train, ecgtwin.privacy, ecgtwin.site, ...), no cycle."""
    def unit(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else name

    edges: dict[str, set[str]] = {}
    units = {unit(x) for x in graph()}
    for m, targets in graph().items():
        for i in targets:
            if unit(i) != unit(m) and unit(i) in units:
                edges.setdefault(unit(m), set()).add(unit(i))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if reaches(b, a, {b}))
    assert cycles == []


def test_ecgtwin_never_imports_flower() -> None:
    offenders = [module_name(p) for p in (ROOT / "ecgtwin").rglob("*.py") if any(
        i.split(".")[0] == "flwr" for i in imports(p))]
    assert offenders == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: an upward import written into a module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ecgtwin.train.local import local_pass\n")
    assert "ecgtwin.train.local" in imports(bad)
    assert layer("ecgtwin.train.local") > layer("ecgtwin.models.vae")


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """What ecgtwin/, server/ and client/ import is declared in pyproject.toml (a fresh install has it)."""
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    owners = packages_distributions()
    used = {i.split(".")[0] for folder in ("ecgtwin", "server", "client") for p in (ROOT / folder).rglob("*.py")
            for i in imports(p)}
    third_party = {m for m in used if m not in sys.stdlib_module_names and m not in {"ecgtwin", "server", "client"}}
    undeclared = sorted(f"{m} ({', '.join(owners.get(m, ['not installed']))})" for m in third_party
                        if not {d.lower().replace("_", "-") for d in owners.get(m, [m])} & declared)
    assert undeclared == []
