import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "safe_norm" / "__init__.py").read_text())[1]

setup(
    name="safe_norm",
    version=version,
    description=(
        "Drop-in PyTorch spectral normalisation that is valid from registration "
        "(patched torch.nn.utils.spectral_norm)"
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],  # says which parts derive from PyTorch
    packages=find_packages(include=["safe_norm", "safe_norm.*"]),
    package_data={"safe_norm": ["py.typed"]},
    python_requires=">=3.10",
    # The tested range: every minor release from 2.1 (noxfile.py, README "Supported versions");
    # CI runs 2.13.0 and the oldest, 2.1.2.
    install_requires=["torch>=2.1"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.100"],
        "plot": ["matplotlib>=3.5"],  # python -m safe_norm demo --plot
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
)
