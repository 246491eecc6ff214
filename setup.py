"""Build script: the Python package, plus (in a later step) the CUDA extension in csrc/."""

from setuptools import setup

setup()
