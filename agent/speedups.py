"""Pick the compiled hot loops (agent._speedups, built from ext/) or their pure-Python twins.

FASTPATH_PURE=1 forces the twins; FASTPATH_REQUIRE_SPEEDUPS=1 makes a missing or broken compiled module
an import error (CI sets it, so a build that silently fell back cannot pass as compiled). In dom0 the
module is optional: without it the agent runs on the twins.
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
    except (ImportError, AssertionError) as exc:
        LOAD_ERROR = exc
        if os.environ.get("FASTPATH_REQUIRE_SPEEDUPS") == "1":
            raise ImportError("agent._speedups is required (FASTPATH_REQUIRE_SPEEDUPS=1): %s" % exc)
    else:
        impl = _compiled
        COMPILED = True

bitmap_runs = impl.bitmap_runs
bitmap_count = impl.bitmap_count
bitmap_claim = impl.bitmap_claim
is_zero = impl.is_zero
zero_runs = impl.zero_runs
