"""The workstation's model-family registry: one table, lazy imports, no import circles in export/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from edge_vla.errors import EdgeVlaError
from edge_vla.export import families
from edge_vla.runtime.contract import REFERENCE_FAMILY

EXPORT_DIR = Path(__file__).resolve().parents[2] / "export"
PACKAGE = "edge_vla.export"


def _module_name(path: Path) -> str:
    rel = path.relative_to(EXPORT_DIR).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every export module `path` imports, at module level or inside a function, TYPE_CHECKING included."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in modules and t != me:
                found.add(t)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = [p for p in EXPORT_DIR.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle() -> None:
    """Control: the checker can tell a circle from none."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_export_has_no_import_circles() -> None:
    """Circles counted with function-level and TYPE_CHECKING imports too (export_cli <-> pi0/cli and
    teacher <-> pi0/teacher were two; a family is reached only through the registry's module table)."""
    graph = _import_graph()
    assert f"{PACKAGE}.families" in graph and f"{PACKAGE}.pi0.family" in graph
    assert _cycles(graph) == []


def test_every_manifest_family_is_registered_and_unknown_ones_get_one_line() -> None:
    assert set(families.names()) == {"pi0", REFERENCE_FAMILY}
    for name in families.names():
        family = families.get(name)
        assert name == family.NAME
        for hook in ("is_checkpoint", "check_export_args", "export", "export_bundle", "load_teacher", "torch_policy"):
            assert callable(getattr(family, hook)), (name, hook)
    with pytest.raises(EdgeVlaError, match="unknown model family 'groot'.*pi0"):
        families.get("groot")


def test_checkpoints_are_claimed_by_their_family(tmp_path: Path) -> None:
    pi0 = tmp_path / "pi0"
    pi0.mkdir()
    (pi0 / "config.json").write_text('{"model_type": "pi0"}')
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text('{"preset": "tiny"}')
    assert families.for_checkpoint(pi0).NAME == "pi0"
    assert families.for_checkpoint(ours).NAME == REFERENCE_FAMILY


def test_dispatching_a_reference_checkpoint_never_imports_transformers(tmp_path: Path) -> None:
    """Lazy: the reference family's path must not pay for (or need) transformers."""
    code = ("import sys; from edge_vla.export import families; "
            f"f = families.for_checkpoint({str(tmp_path)!r}); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print(f.NAME)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == REFERENCE_FAMILY
