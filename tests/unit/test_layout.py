"""The layout's dependency rules, checked on every import statement in the code
(function-local ones included):

* the Saga Log (`sagalog`) knows nothing of the coordinator or the cluster;
* the coordinator knows nothing of the cluster;
* nothing a deployment runs (the node runtime, the client, the participant SDK and
  the modules they share) imports the test kit;
* the participant SDK needs only the shared modules, not a node or a client.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("cluster.auth", "cluster.grpcutil", "cluster.localstate", "cluster.tls")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from cluster import auth` imports cluster.auth
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules(package: str) -> dict[str, set[str]]:
    directory = ROOT / package.replace(".", "/")
    paths = [directory.with_suffix(".py")] if not directory.is_dir() else directory.rglob("*.py")
    return {module_name(p): imports_of(p) for p in paths}


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {imported}"
        for package in packages
        for module, imported_names in modules(package).items()
        for imported in imported_names
        if any(under(imported, f) for f in forbidden)
    )


DEPLOYED = ("cluster.runtime", "cluster.client", "cluster.participant", *SHARED)


@pytest.mark.parametrize(
    "packages,forbidden",
    [
        (("sagalog",), ("coordinator", "cluster")),
        (("coordinator",), ("cluster",)),
        (DEPLOYED, ("cluster.testkit",)),
        (("cluster.participant",), ("cluster.runtime", "cluster.client", "cluster.testkit")),
        (SHARED, ("cluster.runtime", "cluster.client", "cluster.participant")),
    ],
)
def test_dependency_rule(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert modules(packages[0]), f"no modules found in {packages[0]}"
    assert offenders(packages, forbidden) == []


def test_the_scanner_sees_imports() -> None:
    """The rules above are not vacuous: known imports are found, local ones too."""
    testkit = modules("cluster.testkit")
    assert "cluster.testkit.launcher" in testkit["cluster.testkit.commands"]
    assert "cluster.auth" in modules("cluster.runtime")["cluster.runtime.node"]
    assert offenders(("cluster.testkit",), ("cluster.client",)) != []
