"""Build script: the Python package, the Triton kernels (``kernels/`` installed as
``memformer_fast.kernels``) and the replay-buffer extension ``memformer_fast._C``."""

from setuptools import setup

setup(
    packages=["memformer_fast", "memformer_fast.kernels"],
    package_dir={"memformer_fast": "memformer_fast", "memformer_fast.kernels": "kernels"},
)
