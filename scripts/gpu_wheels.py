"""Wheels for a GPU machine whose Python 3.12 has only torch: fetch them here, install them there.

Owns ``WHEELS`` (what dice_ds needs beyond torch to run ``scripts/gpu_check.sh``, and why each),
``fetch`` (downloads them into ``.whl/`` for CPython 3.12 on x86-64 Linux, one version of each,
pinned as ``pyproject.toml`` pins them or as installed in this ``.venv``; checks that every
runtime requirement of every wheel is shipped or comes with torch, and the total size) and
``install`` (on the GPU machine, standard library only: installs into a target folder the wheels
whose distribution is missing or older there, then copies the working tree's ``dice_ds`` and
``patches/`` as ``dice_ds.patches``, which is what ``pip install .`` would lay out).

    python scripts/gpu_wheels.py fetch [--dest .whl] [--max-mib 40]    # here (network)
    python3 scripts/gpu_wheels.py install --dest .whl --target /tmp/site  # there (offline)

Not shipped: deepspeed (dice_ds builds its groups with ``torch.distributed.new_group``), diffusers
(``--vae none``), pillow (no images are written), transformer-engine (hundreds of MB; the check
uses it only when the machine already has it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WHEELS = {
    # dice_ds's own runtime (pyproject.toml dependencies) that the check imports
    "megatron-core": "the MoE layers (pinned in pyproject.toml)",
    "pydantic": "the --config schema, imported by dice_ds.options (pinned in pyproject.toml)",
    "safetensors": "dice_ds.weights (.safetensors files)",
    "numpy": "dice_ds.moe and megatron-core",
    "tqdm": "progress bars of the weight loader and sampler",
    # their requirements
    "packaging": "megatron-core, pytest",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic (needs a newer one than torch)",
    "setuptools": "torch.utils.cpp_extension, imported by megatron-core (a pip install of torch "
                  "on 3.12 brings it; shipped in case the machine's torch came another way)",
    # step 'tests' (pytest tests/gpu)
    "pytest": "tests/gpu",
    "pluggy": "pytest",
    "iniconfig": "pytest",
    "pygments": "pytest",
}
PINNED = ("megatron-core", "pydantic", "pydantic-core")
"""Installed there whatever version the machine has (dice_ds's API pins)."""
WITH_TORCH = {"torch", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
              "markupsafe", "fsspec", "setuptools", "triton"}
"""Distributions a torch install brings (nvidia-* too): a requirement on one of them is met."""
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    dist, version = path.name.split("-")[:2]
    return norm(dist), version


def _pyproject_pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return {norm(m.group(1)): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"]+)"', deps)}


def _versions() -> dict[str, str]:
    """The version to fetch of each wheel: pyproject's pin, else this environment's."""
    from importlib.metadata import PackageNotFoundError, version

    pins = _pyproject_pins()
    out = {}
    for name in WHEELS:
        if name in pins:
            out[name] = pins[name]
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {name} is not installed here (bash scripts/setup.sh dev) "
                             "and has no pin in pyproject.toml") from None
    return out


def requirements(path: Path) -> list[str]:
    """Names this wheel requires on the target (Requires-Dist with its marker evaluated)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(TARGET_ENV):
            out.append(norm(req.name))
    return out


def fetch(dest: Path, max_mib: float) -> int:
    versions = _versions()
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(dest),
           *[f"{n}=={v}" for n, v in versions.items()]]
    print("gpu_wheels: " + " ".join(cmd[3:]), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = {}
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path)
        if versions.get(name) != version:  # another version, or a distribution no longer listed
            path.unlink()
            print(f"gpu_wheels: removed {path.name}", file=sys.stderr)
            continue
        wheels[name] = path
    problems = [f"{n}=={v}: no wheel downloaded" for n, v in versions.items() if n not in wheels]
    for name, path in wheels.items():
        problems += [f"{name} requires {r}, which is neither shipped nor part of a torch install"
                     for r in requirements(path)
                     if r not in wheels and r not in WITH_TORCH and not r.startswith("nvidia-")]
    size = sum(p.stat().st_size for p in wheels.values())
    if size > max_mib * 2**20:
        problems.append(f"{size / 2**20:.1f} MiB of wheels, over --max-mib {max_mib:g}")
    for path in wheels.values():
        print(f"  {path.name}  {path.stat().st_size / 2**20:.2f} MiB")
    print(f"gpu_wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}")
    if problems:
        print("gpu_wheels: " + "\n  ".join(["problems:", *problems]), file=sys.stderr)
        return 1
    print('carry: [".whl"]   command: bash scripts/gpu_check.sh   (results under $OUT)')
    return 0


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _key(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def select(dest: Path) -> tuple[list[Path], dict]:
    """The wheels to install here: missing, older, or pinned and different."""
    chosen, why = [], {}
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path)
        have = _installed(name)
        if have is None:
            why[name] = f"{version} (missing)"
        elif name in PINNED and have != version:
            why[name] = f"{version} (pinned; machine has {have})"
        elif _key(have) < _key(version):
            why[name] = f"{version} (machine has {have})"
        else:
            why[name] = f"machine's {have} kept"
            continue
        chosen.append(path)
    return chosen, why


def _extract(paths: list[Path], target: Path) -> None:
    """pip's --target install without pip: unpack, moving ``*.data/{purelib,platlib}`` up."""
    for path in paths:
        with zipfile.ZipFile(path) as z:
            z.extractall(target)
        for data in target.glob("*.data"):
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    shutil.copytree(data / sub, target, dirs_exist_ok=True)
            shutil.rmtree(data)


def install(dest: Path, target: Path, report: Path | None) -> int:
    target.mkdir(parents=True, exist_ok=True)
    chosen, why = select(dest) if dest.is_dir() else ([], {})
    how = "none needed"
    if chosen:
        try:
            import pip  # noqa: F401

            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                            *map(str, chosen)], check=True)
            how = "pip"
        except ImportError:
            _extract(chosen, target)
            how = "unzip (no pip)"
    for sub in ("dice_ds",):
        shutil.rmtree(target / sub, ignore_errors=True)
    shutil.copytree(ROOT / "dice_ds", target / "dice_ds",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "patches", target / "dice_ds" / "patches",
                    ignore=shutil.ignore_patterns("__pycache__"))
    info = {"dest": str(dest), "target": str(target), "installer": how, "wheels": why}
    if report:
        report.write_text(json.dumps(info, indent=1))
    print(f"gpu_wheels: {len(chosen)} of {len(why)} wheels installed into {target} ({how}); "
          "dice_ds copied from the working tree", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_wheels.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the wheels here")
    f.add_argument("--dest", type=Path, default=ROOT / ".whl")
    f.add_argument("--max-mib", type=float, default=40.0)
    i = sub.add_parser("install", help="install them on the GPU machine")
    i.add_argument("--dest", type=Path, default=ROOT / ".whl")
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--report", type=Path, default=None, help="JSON of what was installed")
    s = sub.add_parser("select", help="print what install would install, and why")
    s.add_argument("--dest", type=Path, default=ROOT / ".whl")
    a = p.parse_args(argv)
    if a.cmd == "fetch":
        return fetch(a.dest, a.max_mib)
    if a.cmd == "install":
        return install(a.dest, a.target, a.report)
    print(json.dumps(select(a.dest)[1], indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
