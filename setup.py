"""Build the optional compiled speedups (agent._speedups) from ext/.

Everything else is declared in pyproject.toml. The agent never needs the extension: every function in
it has a pure-Python twin in agent/_pyspeedups.py, chosen at import time by agent/speedups.py (which
also runs a known-answer self-test on the compiled module before using it).

Flags: -O3 for the loops; no -march=native (the module must run on any x86-64 the build is copied to);
-Wno-error so that a warning from a newer compiler or Cython (or a -Werror in the environment's
CFLAGS) never fails the build of this optional module.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "agent._speedups",
                ["ext/_speedups.pyx"],
                extra_compile_args=["-O3", "-Wno-error"],
            )
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
