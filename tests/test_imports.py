"""The design card's import rules, read from the source with ast: scripts import libraries,
never each other, and no library imports a script; no two modules import each other
(nor any longer ring of them). Imports inside functions count too."""
import ast
import os

from conftest import ROOT

SCRIPTS = {'train', 'sample', 'eval', 'demo', 'bench', 'pretrain', 'prepare'}


def top_level_modules():
    return {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}


def imports(module, modules):
    """The project's modules that `module` imports anywhere in its file."""
    with open(os.path.join(ROOT, f'{module}.py')) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return (names & modules) - {module}


def import_graph():
    modules = top_level_modules()
    return {m: imports(m, modules) for m in modules}


def test_no_module_imports_a_script():
    assert SCRIPTS <= top_level_modules()  # the list names real files
    bad = {f'{m} imports {s}' for m, deps in import_graph().items() for s in deps & SCRIPTS}
    assert not bad, sorted(bad)


def test_no_import_cycles():
    graph, cycles = import_graph(), set()

    def visit(m, path):
        for d in graph[m]:
            if d in path:
                cycles.add(' -> '.join(path[path.index(d):] + [d]))
            else:
                visit(d, path + [d])
    for m in graph:
        visit(m, [m])
    assert not cycles, sorted(cycles)
