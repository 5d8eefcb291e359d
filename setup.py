"""Build the compiled data path: p2pvpn._fastpath, linked against system libcrypto."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "p2pvpn._fastpath",
        sources=["src/p2pvpn/_fastpath.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
