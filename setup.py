"""Packaging for visualizer: capture attention maps (any named local) from PyTorch models.

The import name is `visualizer`; the distribution is `getlocal-visualizer`,
because an unrelated project already owns `visualizer` on PyPI.
"""
import pathlib

from setuptools import find_packages, setup

README = pathlib.Path(__file__).with_name("README.md")

setup(
    name="getlocal-visualizer",
    version="0.1.0",
    description=(
        "Capture attention maps and any named local variable from deep inside PyTorch "
        "models without editing them, then measure and draw them"
    ),
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["visualizer", "visualizer.*"]),
    # py.typed: the package is typed (PEP 561); the explorer's page is built
    # from its script and style.
    package_data={"visualizer": ["py.typed", "explorer.js", "explorer.css"]},
    python_requires=">=3.9",
    # The capture core needs only these; torch and matplotlib are extras so
    # the core installs (and is tested) on Pythons without them. Every lower
    # bound is a release CI tests (.ci/torch_matrix, README "Supported
    # versions"): torch 2.1.2-2.14.1, transformers 4.48.0-5.24.0, numpy
    # 1.26.4-2.5.5, matplotlib 3.6.3-3.11.2, bytecode 0.16.0-0.19.1.
    install_requires=["bytecode>=0.16", "numpy>=1.26.4"],
    extras_require={
        "torch": ["torch>=2.1.2"],
        "plot": ["matplotlib>=3.6.3"],
        "all": ["torch>=2.1.2", "matplotlib>=3.6.3"],
        "test": [
            "pytest>=7",
            "cloudpickle>=2",
            "hypothesis>=6",
            "transformers>=4.48.0",
            "nbformat>=5",
            "nbclient>=0.7",
            "ipykernel>=6",
            "mypy>=1.10",
            "playwright>=1.40",
            "nbconvert>=7",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Visualization",
    ],
)
