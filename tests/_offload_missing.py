"""A module that the offload tests' workers cannot import (their environment says so)."""

import os

if os.environ.get("SHOAL_TEST_REFUSE_IMPORT"):
    raise ImportError("No module named '_offload_missing' where this worker runs")

VALUE = 1
