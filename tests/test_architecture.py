"""Architecture rules (issue 10), read from the sources (AST, nothing imported):

- production code never imports the test helpers (`persongen_jax.testing`);
- no import cycle between the package's modules (module-level imports);
- the condition names of the method ("bg", "body") appear as literals only where conditions are declared
  (conditions.py, configs, the generate CLI's --prompt-bg / --prompt-body aliases), not in the stages that
  loop over the declared conditions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = [p for d in ("persongen_jax", "weights_conversion") for p in sorted((REPO / d).rglob("*.py"))
              if "testing" not in p.relative_to(REPO).parts]
# Where the names of today's conditions may be spelled out (data, not wiring).
CONDITION_LITERALS_ALLOWED = {"persongen_jax/conditions.py", "persongen_jax/generate.py"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool, modules=()) -> set[str]:
    """The modules `path` imports. `from pkg import name` is pkg.name when that is a module (a submodule
    import: pkg/__init__ is not re-entered), else pkg."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            out |= (subs & set(modules)) or {node.module}
            if subs - set(modules):
                out.add(node.module)
    return out


def test_production_code_does_not_import_test_helpers():
    offenders = [str(p.relative_to(REPO)) for p in PRODUCTION
                 if any(m == "persongen_jax.testing" or m.startswith("persongen_jax.testing.")
                        for m in _imports(p, top_level_only=False))]
    assert not offenders, f"production modules importing persongen_jax.testing: {offenders}"


def test_no_import_cycles():
    modules = {_module(p): p for p in PRODUCTION}
    graph = {m: {i for i in _imports(p, top_level_only=True, modules=modules) if i in modules and i != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_condition_names_only_where_conditions_are_declared():
    offenders = []
    for p in PRODUCTION:
        rel = str(p.relative_to(REPO))
        if rel in CONDITION_LITERALS_ALLOWED:
            continue
        tree = ast.parse(p.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in ("bg", "body") and id(node) not in docstrings):
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, f"condition names outside their declarations: {offenders}"
