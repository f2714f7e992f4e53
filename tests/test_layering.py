"""Imports flow one way (README / team rules): kernels ← ops ← model ← train, with data and convert beside the
model; eval above them; and no module imports itself in a circle. Checked on every ``import`` statement of the
package's source (top-level or inside a function), so an import added anywhere is caught."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lct_jax"

# files (globs under lct_jax/) -> lct_jax modules they must never import
RULES = {
    ("model/*.py", "ops/*.py", "kernels/*.py", "sharding.py"): (
        "lct_jax.data",
        "lct_jax.train",
        "lct_jax.eval",
    ),
    ("data/*.py",): ("lct_jax.model", "lct_jax.train", "lct_jax.eval"),
    ("clip_constants.py",): ("lct_jax",),  # a leaf: data, model and eval all import it
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the file's package
            base = ".".join(("lct_jax", *path.relative_to(PKG).parent.parts)).rsplit(".", node.level - 1)[0]
            names |= {f"{base}.{node.module}" if node.module else base}
    return names


@pytest.mark.parametrize(
    "globs,forbidden", RULES.items(), ids=lambda x: x[0] if isinstance(x, tuple) else None
)
def test_import_direction(globs, forbidden):
    files = [f for g in globs for f in sorted(PKG.glob(g))]
    assert files, globs
    bad = {
        f"{f.relative_to(PKG)}: {m}"
        for f in files
        for m in imported_modules(f)
        if m == forbidden or any(m == p or m.startswith(p + ".") for p in forbidden)
    }
    assert not bad, sorted(bad)


def test_no_import_circles():
    files = {".".join(("lct_jax", *f.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__"): f
             for f in PKG.rglob("*.py")}  # fmt: skip
    graph = {m: {d for d in imported_modules(f) if d in files and d != m and not m.startswith(d + ".")}
             for m, f in files.items()}  # fmt: skip
    circles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
