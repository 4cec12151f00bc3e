"""What the code promises its readers: short functions, lines of at most 100 columns, no import
cycle between pbrl's modules (each can be read, imported and tested on its own)."""
import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READ = sorted(ROOT.glob("pbrl/**/*.py")) + [ROOT / "train.py", ROOT / "eval.py"]


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


def module_name(file: Path) -> str:
    """pbrl/kernels/cosine.py -> pbrl.kernels.cosine; a package's __init__.py -> the package."""
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(file: Path) -> set[str]:
    """The pbrl modules (pbrl.kernels's among them) a file imports, at its top or inside a
    function: `from pbrl import kernels` names pbrl.kernels, `from pbrl.kernels.cosine import f`
    the module pbrl.kernels.cosine."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pbrl":
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pbrl"}
    return found


def test_no_import_cycle():
    graph = {module_name(f): imports(f) for f in READ if f.parent != ROOT}
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


def importable_at_root() -> set[str]:
    """The names `import X` finds in the repository root and in tests/ (pytest.ini puts both on the
    path): modules and regular packages. A namespace directory (no __init__.py) shadows nothing."""
    found = set()
    for folder in (ROOT, ROOT / "tests"):
        found |= {p.stem for p in folder.glob("*.py")}
        found |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return found


def test_nothing_in_the_root_shadows_an_installed_distribution():
    """A top-level `kernels/` once hid Hugging Face's `kernels`, which transformers imports: every
    test that built an oracle model failed. Any root-level name an installed distribution also
    provides would do the same to whoever imports it from the repository root."""
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in importable_at_root() if name in installed}
    assert not clashes, f"names in the repository root that installed packages provide: {clashes}"


def test_transformers_and_every_pbrl_module_import_together_from_the_root():
    """One fresh process started in the repository root (its directory first on the path, as for
    any script or notebook there) imports transformers' model classes, which pull in its optional
    integrations, then every pbrl module, pbrl.kernels's included, whatever versions the README's
    install resolved to."""
    modules = sorted(module_name(f) for f in READ if f.parent != ROOT)
    assert "pbrl.kernels" in modules and "pbrl.kernels.logprobs" in modules, modules
    code = ("import importlib, sys\n"
            "from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sys.modules['pbrl.kernels'].__file__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(ROOT / "pbrl" / "kernels" / "__init__.py"), done.stdout
