"""What the code promises its readers: short functions, lines of at most 100 columns, no import
cycle between pbrl's modules (each can be read, imported and tested on its own)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READ = sorted(ROOT.glob("pbrl/*.py")) + sorted(ROOT.glob("kernels/*.py")) + \
    [ROOT / "train.py", ROOT / "eval.py"]


def test_no_function_over_60_lines_and_no_line_over_100_columns():
    long_functions, wide = [], []
    for file in READ:
        source = file.read_text()
        wide += [f"{file.name}:{i}" for i, line in enumerate(source.splitlines(), 1)
                 if len(line) > 100]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 60:
                    long_functions.append(f"{file.name}:{node.name}")
    assert not long_functions and not wide, (long_functions, wide)


def imports(file: Path) -> set[str]:
    """The pbrl and kernels modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("pbrl", "kernels"):
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module.split(".")[0] in ("pbrl", "kernels"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("pbrl", "kernels")}
    return found


def test_no_import_cycle():
    graph = {f"{f.parent.name}.{f.stem}": imports(f) for f in READ if f.parent != ROOT}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    done, cycles = set(), []

    def visit(module, path):
        for dep in graph[module]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)
    for module in graph:
        visit(module, [module])
    assert not cycles, cycles
