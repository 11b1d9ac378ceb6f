"""The import structure: megatron behind one package, no package-level cycle, imports at the top.

Read from the source with ``ast`` (nothing is imported): a *unit* is a top-level module of
dice_ds (``dice_ds.schedule``) or a subpackage (``dice_ds.moe``); an arrow joins two units when a
module of one imports a module of the other, at the top of a file or inside a function. A
function-level import of dice_ds's own modules, or an ``importlib.import_module`` call (a module
chosen by name at run time), is allowed only where ``ALLOWED_LAZY`` names it with its reason (an
optional heavy dependency behind it, or an entry point choosing what to load).
"""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "dice_ds")
MEGATRON_PACKAGE = "dice_ds.mcore"
DYNAMIC = "importlib.import_module"

ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("dice_ds.moe.runtime", "dice_ds.moe"):
        "dice_ds.moe.dispatcher subclasses megatron's dispatcher (dice_ds.mcore), so importing it "
        "imports megatron: loaded when an EP runtime is built, not when the runtime is imported",
    ("dice_ds", DYNAMIC):
        "``dice_ds.DiTMoEPipeline`` is imported on first access, so that ``import dice_ds`` loads "
        "no torch (tests/unit/test_pipeline.py)",
    ("dice_ds.cli", DYNAMIC):
        "one table names each subcommand's module and only the chosen one is imported, so that "
        "``dice-ds --help`` and a bad ``dice-ds sample`` flag answer before torch loads",
    ("dice_ds.pipeline.diffusers_api", "dice_ds.diffusion.schedulers"):
        "dice_ds.diffusion.schedulers imports diffusers (seconds): loaded only when a pipeline's "
        "scheduler object is read or set, so that dice-ds sample and import dice_ds never load it",
    ("dice_ds.sample.entry", "dice_ds.sample"):
        "dice_ds.sample.job (torch, the pipeline) is imported after the flags and the launcher's "
        "environment are checked, so that a bad input fails before torch loads",
}
"""(importing module, imported module) -> why the import waits until it is needed."""


def _modules():
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield mod.removesuffix(".__init__"), path, name == "__init__.py"


def _imports(mod, path, is_init):
    """(imported module, line, at top level) of every import in ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = {id(node) for node in tree.body}
    package = mod.split(".") if is_init else mod.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top


def _dynamic_imports(path):
    """Lines of the ``importlib.import_module(...)`` calls in ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"]


def _unit(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def test_megatron_is_imported_by_one_package_only():
    outside = sorted({f"{mod}:{line}" for mod, path, init in _modules()
                      for name, line, _ in _imports(mod, path, init)
                      if name.split(".")[0] == "megatron" and _unit(mod) != MEGATRON_PACKAGE})
    assert not outside, f"megatron imported outside {MEGATRON_PACKAGE}: {outside}"


def test_no_package_level_import_cycle():
    arrows: dict[str, set] = {}
    for mod, path, init in _modules():
        for name, _, _ in _imports(mod, path, init):
            if name.startswith("dice_ds.") and _unit(name) != _unit(mod):
                arrows.setdefault(_unit(mod), set()).add(_unit(name))

    def reaches(start, goal, seen):
        for nxt in arrows.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    cycles = sorted(u for u in arrows if reaches(u, u, set()))
    assert not cycles, f"units on an import cycle: {cycles}"


def test_function_level_imports_of_our_modules_are_few_and_explained():
    lazy = {}
    for mod, path, init in _modules():
        for name, line, at_top in _imports(mod, path, init):
            if not at_top and name.startswith("dice_ds") and _unit(name) != MEGATRON_PACKAGE:
                lazy.setdefault((mod, name), []).append(line)
        if _unit(mod) != MEGATRON_PACKAGE:
            for line in _dynamic_imports(path):
                lazy.setdefault((mod, DYNAMIC), []).append(line)
    unexplained = sorted(f"{m} -> {n} (line {lines[0]})" for (m, n), lines in lazy.items()
                         if (m, n) not in ALLOWED_LAZY)
    assert not unexplained, "function-level imports of dice_ds modules:\n" + "\n".join(unexplained)
    assert len(lazy) <= 8, f"{len(lazy)} lazy imports: a handful at most"


def test_importing_dice_ds_and_its_runtime_imports_no_megatron():
    code = ("import sys, dice_ds, dice_ds.models, dice_ds.moe.runtime, dice_ds.parallel.apply, "
            "dice_ds.schedule; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('megatron', 'deepspeed')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_dice_ds_help_and_a_bad_sample_flag_answer_before_torch_loads():
    code = ("import contextlib, io, sys\n"
            "from dice_ds.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n"
            "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
            "    try:\n"
            "        code = main(['sample', '--model', 'nope'])\n"
            "    except SystemExit as e:\n"
            "        code = e.code\n"
            "assert code == 2 and 'nope' in err.getvalue(), (code, err.getvalue())\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'deepspeed')]\n"
            "assert not bad, bad[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
