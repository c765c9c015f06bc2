"""Build the optional compiled speedups (agent._speedups) from ext/.

Everything else is declared in pyproject.toml. The agent never needs the extension: every function in
it has a pure-Python twin in agent/_pyspeedups.py, chosen at import time by agent/speedups.py.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("agent._speedups", ["ext/_speedups.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
