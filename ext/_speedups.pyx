# cython: language_level=3
# Bootstrap placeholder, replaced by the real compiled loops (see agent/_pyspeedups.py for the contract).
from agent._pyspeedups import bitmap_runs, bitmap_count, bitmap_claim, is_zero, zero_runs  # noqa
