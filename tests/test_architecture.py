"""Architecture rules, read from the sources (AST, nothing imported):

- production code never imports the test helpers (`persongen_jax.testing`);
- no import cycle between the package's modules, function-level imports counted;
- no entry point (a module run as `python -m`) imports another; the library never imports `configs/`;
- the sampling defaults (guidance scale, scheduler, step count, start_merge_step) are written once;
- the condition names of the method ("bg", "body") appear as literals only where conditions are declared
  (conditions.py, configs, the generate CLI's --prompt-bg / --prompt-body aliases), not in the stages that
  loop over the declared conditions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = [
    p
    for d in ("persongen_jax", "weights_conversion")
    for p in sorted((REPO / d).rglob("*.py"))
    if "testing" not in p.relative_to(REPO).parts
]
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
    offenders = [
        str(p.relative_to(REPO))
        for p in PRODUCTION
        if any(
            m == "persongen_jax.testing" or m.startswith("persongen_jax.testing.")
            for m in _imports(p, top_level_only=False)
        )
    ]
    assert not offenders, f"production modules importing persongen_jax.testing: {offenders}"


# Import edges a cycle may use, each with its reason.
CYCLE_EDGES_ALLOWED = {
    # `from_pretrained` of a folder names its model class; the registry is filled by importing the package once.
    ("persongen_jax.models.modeling", "persongen_jax.models"),
}


def test_no_import_cycles():
    """Function-level imports count: a cycle hidden inside a function is still a cycle."""
    modules = {_module(p): p for p in PRODUCTION}
    graph = {
        m: {
            i
            for i in _imports(p, top_level_only=False, modules=modules)
            if i in modules and i != m and (m, i) not in CYCLE_EDGES_ALLOWED
        }
        for m, p in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
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
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("bg", "body") and id(node) not in docstrings:
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, f"condition names outside their declarations: {offenders}"


# Library modules that also have a command line; importing them is importing the library.
LIBRARY_WITH_CLI = {"persongen_jax.data.format"}  # the dataset format (read / write); its main() writes one


def _entry_points() -> dict[str, Path]:
    """Modules run as `python -m ...`: those with an `if __name__ == "__main__":` block (but LIBRARY_WITH_CLI)."""
    out = {}
    for p in PRODUCTION:
        tree = ast.parse(p.read_text())
        if any(
            isinstance(n, ast.If)
            and isinstance(n.test, ast.Compare)
            and isinstance(n.test.left, ast.Name)
            and n.test.left.id == "__name__"
            for n in tree.body
        ):
            out[_module(p)] = p
    return {m: p for m, p in out.items() if m not in LIBRARY_WITH_CLI}


def test_entry_points_do_not_import_each_other():
    entries = _entry_points()
    assert {"persongen_jax.generate", "persongen_jax.evaluate", "persongen_jax.app", "persongen_jax.train"} <= set(
        entries
    ), sorted(entries)
    modules = {_module(p) for p in PRODUCTION}
    offenders = [
        f"{m} imports {i}"
        for m, p in entries.items()
        for i in sorted(_imports(p, top_level_only=False, modules=modules))
        if i in entries and i != m
    ]
    assert not offenders, offenders


def test_library_never_imports_configs():
    """A run's config is read from its folder; the experiment configs are files a user names."""
    offenders = [
        str(p.relative_to(REPO))
        for p in PRODUCTION
        if p.relative_to(REPO).parts[0] == "persongen_jax"
        and any(m == "configs" or m.startswith("configs.") for m in _imports(p, top_level_only=False))
    ]
    assert not offenders, offenders


def _default_values(tree: ast.AST):
    """The constants written where defaults are declared: function parameter defaults, class-level fields,
    module-level assignments and `default=` keywords (argparse)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from node.args.defaults
            yield from (d for d in node.args.kw_defaults if d is not None)
        elif isinstance(node, (ast.ClassDef, ast.Module)):
            for stmt in node.body:
                if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
                    yield stmt.value
        elif isinstance(node, ast.keyword) and node.arg == "default":
            yield node.value


def test_sampling_defaults_are_written_once():
    """SamplingSettings owns the defaults; generate, evaluate, the app, the protocol, the pipeline and the
    config's eval section read them from it."""
    from persongen_jax.pipeline.settings import SamplingSettings

    d = SamplingSettings()
    found: dict[str, list[str]] = {k: [] for k in ("guidance_scale", "scheduler", "num_steps", "start_merge_step")}
    for p in sorted((REPO / "persongen_jax").rglob("*.py")):
        for value in _default_values(ast.parse(p.read_text())):
            if not isinstance(value, ast.Constant):
                continue
            for key in found:
                want = getattr(d, key)
                if type(value.value) is type(want) and value.value == want:
                    found[key].append(f"{p.relative_to(REPO)}:{value.lineno}")
    assert all(len(places) == 1 for places in found.values()), found


def test_tests_are_named_by_behaviour_not_by_tracker_numbers():
    """A test's name and docstring say what it checks: an issue's or a defect's number means nothing to a
    reader without the tracker (and goes stale when it moves)."""
    tracker = re.compile(r"\b(issue|defect|task)\s*#?\d+", re.IGNORECASE)
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        for node in nodes:
            name = getattr(node, "name", path.name)
            text = f"{name} {ast.get_docstring(node) or ''}"
            if tracker.search(text.replace("_", " ")):
                found.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 1)} {name}")
    assert not found, "named after a tracker number:\n" + "\n".join(found)
