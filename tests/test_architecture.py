"""The layers import one way (modrwkv_kernels < modrwkv < preprocessing < pipelines < the CLI; infra beside,
importing none of them), no module imports itself back through others, and the model package loads no job framework."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modrwkv_kernels", "modrwkv", "preprocessing", "pipelines", "infra")
MAY_IMPORT = {
    "modrwkv_kernels": set(),
    "modrwkv": {"modrwkv_kernels"},
    "preprocessing": {"modrwkv_kernels", "modrwkv"},
    "pipelines": {"modrwkv_kernels", "modrwkv", "preprocessing", "infra"},
    "infra": set(),
}
CLI = "pipelines.cli"  # the application's command line: the top; nothing imports it
JOB_FRAMEWORKS = ("ray", "mlflow", "deepspeed", "boto3")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` — a script's entry point, not a dependency of the module."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports_of(path: Path, root: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside functions (the dependency is the same)."""
    name, found = module_name(path, root), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    stack = [n for n in ast.parse(path.read_text()).body if not is_main_guard(n)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module` names the module
            found.add(base)
        stack.extend(c for c in ast.iter_child_nodes(node) if not is_main_guard(c))
    return {m for m in found if m.split(".")[0] in PACKAGES}


def project_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imports_of(path, root):
            while imported and imported not in files:  # `from a.b import name`: the module is a.b
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    layer = {name: name.split(".")[0] for name in graph}
    wrong = [f"{src} imports {dst}" for src, targets in graph.items() for dst in targets
             if layer[dst] != layer[src] and layer[dst] not in MAY_IMPORT[layer[src]]]
    return sorted(wrong + [f"{src} imports the CLI" for src, targets in graph.items() if CLI in targets])


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    state, cycles = {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages export, not a cycle
            if node == nxt.rpartition(".")[0] or nxt == node.rpartition(".")[0]:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_layers_import_only_downwards():
    assert not layer_violations(project_graph()), "\n".join(layer_violations(project_graph()))


def test_no_import_cycles():
    assert not import_cycles(project_graph()), "\n".join(import_cycles(project_graph()))


def test_the_checks_see_a_wrong_import_and_a_cycle(tmp_path):
    tree = {"modrwkv/__init__.py": "from .model import RWKV7\n",
            "modrwkv/model.py": "from . import probe\nRWKV7 = 1\n",
            "modrwkv/probe.py": "def f():\n    from pipelines import train\n    from .model import RWKV7\n",
            "pipelines/__init__.py": "", "pipelines/train.py": "import modrwkv_kernels\n"}
    for name, text in tree.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = project_graph(tmp_path)
    assert layer_violations(graph) == ["modrwkv.probe imports pipelines", "modrwkv.probe imports pipelines.train"]
    assert import_cycles(graph) == ["modrwkv.model -> modrwkv.probe -> modrwkv.model"]


def test_model_package_loads_no_job_framework():
    code = ("import sys, modrwkv, modrwkv.multimodal, modrwkv.chat, modrwkv.generation, modrwkv.inference; "
            f"print(','.join(m for m in {JOB_FRAMEWORKS!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""


def test_cli_loads_no_job_framework_before_a_job_runs():
    code = ("import sys, pipelines.cli; pipelines.cli.build_parser(); "
            f"print(','.join(m for m in {JOB_FRAMEWORKS!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""


def test_the_conversation_format_loads_no_torch():
    """Turns, the template, sample records and the tokenizer: what data jobs and evaluation's scoring read, in a
    fresh interpreter, without torch."""
    code = ("import sys, modrwkv.conversation, modrwkv.tokenizer, preprocessing.cache.entry; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'triton'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
