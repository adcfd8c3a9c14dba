"""A scoring function for RewardPool tests: exact string match, plus marker inputs that misbehave.

Markers (the response): HANG sleeps 60 s, RAISE raises, CRASH kills the worker process. Environment
variables for worker startup (importing this module): IMPORT_DELAY_ENV sleeps that many seconds,
IMPORT_FAIL_ENV makes the import fail.
"""

import os
import time

HANG = "HANG"
RAISE = "RAISE"
CRASH = "CRASH"
IMPORT_DELAY_ENV = "SPEED_ASYNC_TEST_SCORER_IMPORT_DELAY_S"
IMPORT_FAIL_ENV = "SPEED_ASYNC_TEST_SCORER_IMPORT_FAIL"

time.sleep(float(os.environ.get(IMPORT_DELAY_ENV, "0")))
if os.environ.get(IMPORT_FAIL_ENV):
    raise ImportError(f"{IMPORT_FAIL_ENV} is set")


def score(response: str, ground_truth: str) -> float:
    """1.0 if ``response == ground_truth`` else 0.0, unless ``response`` is a marker."""
    if response == HANG:
        time.sleep(60.0)
    if response == RAISE:
        raise RuntimeError("scorer failed on purpose")
    if response == CRASH:
        os._exit(3)
    return 1.0 if response == ground_truth else 0.0
