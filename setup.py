"""Build the compiled modules, linked against system libcrypto.

p2pvpn._gcm: AES-256-GCM for datagrams. p2pvpn._fastpath: the data plane,
which cimports _gcm (its .pxd) and includes its _fastpath_*.pxi files.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup


def _extension(name: str) -> Extension:
    return Extension(
        f"p2pvpn.{name}",
        sources=[f"src/p2pvpn/{name}.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O3"],
    )


setup(
    ext_modules=cythonize(
        [_extension("_gcm"), _extension("_fastpath")],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
