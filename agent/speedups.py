"""Pick the compiled hot loops (agent._speedups, built from ext/) or their pure-Python twins.

FASTPATH_PURE=1 forces the twins; FASTPATH_REQUIRE_SPEEDUPS=1 makes a missing or broken compiled module
an import error (CI sets it, so a build that silently fell back cannot pass as compiled). In dom0 the
module is optional: without it the agent runs on the twins.

The compiled module must pass the twins' known-answer self-test before it is used; a module that fails
it (or raises anything while running it) is treated like a missing one and recorded in LOAD_ERROR.

Call the functions through this module (`from agent import speedups; speedups.bitmap_runs(...)`) so that
the choice made here applies everywhere.
"""

import os

from agent import _pyspeedups as pure

COMPILED = False
LOAD_ERROR = None
impl = pure

if os.environ.get("FASTPATH_PURE") != "1":
    try:
        from agent import _speedups as _compiled

        pure.self_test(_compiled)
    except Exception as exc:  # ImportError, AssertionError, or a crash inside a broken build
        LOAD_ERROR = exc
        if os.environ.get("FASTPATH_REQUIRE_SPEEDUPS") == "1":
            raise ImportError(
                "agent._speedups is required (FASTPATH_REQUIRE_SPEEDUPS=1): %r" % (exc,)
            ) from exc
    else:
        impl = _compiled
        COMPILED = True

bitmap_runs = impl.bitmap_runs
bitmap_count = impl.bitmap_count
bitmap_claim = impl.bitmap_claim
block_runs = impl.block_runs
is_zero = impl.is_zero
zero_runs = impl.zero_runs
