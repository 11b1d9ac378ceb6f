"""The megatron boundary (``dice_ds/mcore``): the only importer of megatron, imported lazily; entry
points prepare it, ``build_model`` only asserts that they did."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


def test_importing_dice_ds_models_runtime_and_apply_imports_no_megatron():
    proc = _run("import dice_ds, dice_ds.models, dice_ds.moe.runtime, dice_ds.parallel.apply\n"
                "import dice_ds.pipeline.build, dice_ds.mcore, sys\n"
                "bad = sorted(m for m in sys.modules if m.startswith('megatron'))\n"
                "assert not bad, bad[:5]\n"
                "from dice_ds.mcore import MoEAlltoAllTokenDispatcher\n"
                "assert 'megatron.core' in sys.modules\n")
    assert proc.returncode == 0, proc.stderr[-2000:]


def _megatron_importers() -> set[str]:
    found = set()
    for base in ("dice_ds", "tests"):  # scripts/gpu_check_steps.py stages a GPU check on gloo
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    if any(n == "megatron" or n.startswith("megatron.") for n in names):
                        found.add(os.path.relpath(path, ROOT))
    return found


def test_only_dice_ds_mcore_imports_megatron():
    importers = _megatron_importers()
    assert importers and all(p.startswith("dice_ds/mcore/") for p in importers), sorted(importers)


def test_build_model_starts_nothing_and_names_the_entry_point_call():
    proc = _run("import torch.distributed as dist\n"
                "from dice_ds.config import get_flavor\n"
                "from dice_ds.models import build_model\n"
                "from dice_ds.patches.megatron_cpu import patches_applied\n"
                "try:\n"
                "    build_model(get_flavor('debug'))\n"
                "except RuntimeError as e:\n"
                "    assert 'dice_ds.mcore.prepare' in str(e), e\n"
                "else:\n"
                "    raise AssertionError('built without prepare')\n"
                "assert not dist.is_initialized() and not patches_applied()\n"
                "from dice_ds import mcore\n"
                "mcore.prepare('cpu')\n"
                "assert patches_applied() and mcore.prepared('cpu')\n"
                "try:\n"
                "    build_model(get_flavor('debug'))\n"
                "except RuntimeError as e:\n"
                "    assert 'local_model_groups' in str(e), e\n"
                "assert not dist.is_initialized()\n"
                "import atexit\n"  # runs after the groups' own at-exit teardown (LIFO)
                "atexit.register(lambda: print('at exit, initialized:', dist.is_initialized()))\n"
                "from dice_ds.parallel.groups import init_distributed\n"
                "init_distributed('cpu')\n"
                "m = build_model(get_flavor('debug'))\n"
                "assert m.moe_layers()[0].experts.__class__.__module__ == 'dice_ds.mcore.experts'\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the group init_distributed started is destroyed at exit (dice_ds/parallel/groups.py)
    assert "at exit, initialized: False" in proc.stdout, proc.stdout


def test_version_check_names_the_pin(monkeypatch):
    import importlib.metadata

    from dice_ds.mcore import MEGATRON_CORE_VERSION, check_version

    assert check_version() == MEGATRON_CORE_VERSION
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(RuntimeError, match=f"megatron-core=={MEGATRON_CORE_VERSION}"):
        check_version()


def test_pin_agrees_with_pyproject():
    from dice_ds.mcore import MEGATRON_CORE_VERSION

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert f'"megatron-core=={MEGATRON_CORE_VERSION}"' in text
