"""dice_ds: DiT-MoE on megatron-core MoE layers with DICE parallel inference.

Core dependencies are pinned exactly: megatron-core's dispatcher API changes between minor versions,
and torch must stay the build already installed (install ``torch==2.13.0`` first on CPU machines; the
pin is then satisfied and nothing pulls a CUDA build). ``patches/`` installs as ``dice_ds.patches``.
"""
from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "diffusers==0.42.1",
    "safetensors>=0.4",
    "numpy>=1.24",
    "pillow>=10",
    "tqdm>=4.66",
    "pydantic==2.14.4",  # the --config schema (dice_ds.ds_config)
]

setup(
    name="dice_ds",
    version="0.1.0",
    description="Parallel inference of Mixture-of-Experts diffusion transformers (DiT-MoE, DICE)",
    python_requires=">=3.10",
    # every dice_ds subpackage, plus patches/ installed as dice_ds.patches
    packages=find_packages(include=["dice_ds", "dice_ds.*"]) + ["dice_ds.patches"],
    package_dir={"dice_ds": "dice_ds", "dice_ds.patches": "patches"},
    include_package_data=True,
    package_data={"dice_ds": ["assets/*.pt", "assets/*.json", "assets/*.md"]},
    install_requires=CORE,
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # dice-ds eval on the shipped digits model (digits data, FID math)
        "eval": ["scikit-learn>=1.3", "scipy>=1.10"],
        # dice-ds eval --fid (FID-50K): torch-fidelity pulls torchvision, whose PyPI wheel is built
        # against CUDA torch; on a CPU-only torch install the matching CPU torchvision first
        "fid": ["scikit-learn>=1.3", "scipy>=1.10", "torch-fidelity==0.4.0"],
        "dev": ["pytest>=8", "scikit-learn>=1.3", "scipy>=1.10"],
    },
    entry_points={"console_scripts": ["dice-ds=dice_ds.cli:main"]},
)
