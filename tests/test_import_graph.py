"""The package's modules import each other without circles (module-level imports and those
written inside functions alike), so each room of the house stands on the ones below it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"linearize": ROOT / "linearize", "linearize.kernels": ROOT / "kernels", "linearize.eval": ROOT / "eval"}


def modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def runtime_nodes(tree: ast.AST):
    """Every node but the bodies of `if TYPE_CHECKING:` (imports that only annotations use)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def imports(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """Known modules that `name` imports at run time. Importing `a.b.c` runs the package
    `a.b` first, so sub-packages count too; the three top packages do not (they always run
    first, before any of their modules)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            while t and t not in PACKAGES:
                if t != name and not name.startswith(t + "."):
                    out.add(t)
                t = t.rsplit(".", 1)[0]
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per back edge of a depth-first walk: empty exactly when the graph has no circle."""
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_import_circles():
    mods = modules()
    graph = {m: imports(m, p.read_text(), set(mods), p.name == "__init__.py") for m, p in mods.items()}
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_walk_sees_function_imports_and_sub_packages_but_not_annotations():
    known = {"linearize", "linearize.state", "linearize.mixers", "linearize.mixers.base", "linearize.mixers.context",
             "linearize.cache", "linearize.convert"}
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .convert import convert\n"
              "def f():\n    from .cache import Cache\nfrom .mixers.context import ForwardContext\n")
    assert imports("linearize.state", source, known) == {"linearize.cache", "linearize.mixers",
                                                         "linearize.mixers.context"}
    graph = {"linearize.state": {"linearize.mixers.context", "linearize.mixers"},
             "linearize.mixers": {"linearize.mixers.base"}, "linearize.mixers.base": {"linearize.state"},
             "linearize.mixers.context": set()}
    assert circles(graph) == [["linearize.mixers", "linearize.mixers.base", "linearize.state", "linearize.mixers"]]
