"""The shape of the code base: no function in production code that only tests call, no import cycle
between the project's modules, no module of the library past ~350 lines."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("llava_tiny", "data_tools", "eval", "bench")
PRODUCTION = (*PACKAGES, "scripts")


def _sources(folders) -> dict[str, str]:
    found = {}
    for folder in folders:
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        found[os.path.relpath(path, ROOT)] = f.read()
    return found


def _module_name(path: str) -> str:
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_production_function_is_called_only_by_tests():
    production, tests = _sources(PRODUCTION), _sources(["tests"])
    only_tests = []
    for path, source in production.items():
        for node in ast.parse(source).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.decorator_list:
                continue  # a decorated definition is used by its decorator (a registry)
            word = re.compile(rf"\b{re.escape(node.name)}\b")
            uses = sum(len(word.findall(text)) for text in production.values()) - 1  # minus its definition
            if uses == 0 and any(word.search(text) for text in tests.values()):
                only_tests.append(f"{path}:{node.lineno} {node.name}")
    assert not only_tests, "defined in production code but called only by tests:\n" + "\n".join(only_tests)


def _imports(module: str, source: str, known: set[str]) -> set[str]:
    """The project modules `module` imports (at any depth of its code: a lazy import is still an edge)."""
    package = module if module in known and any(m.startswith(module + ".") for m in known) else \
        module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def test_no_import_cycle_between_project_modules():
    sources = {_module_name(path): text for path, text in _sources(PACKAGES).items()}
    known = set(sources)
    graph = {module: _imports(module, text, known) for module, text in sources.items()}
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_library_modules_stay_readable():
    long = {path: text.count("\n") for path, text in _sources(["llava_tiny"]).items() if text.count("\n") > 360}
    assert not long, f"files past ~350 lines (split them): {long}"
