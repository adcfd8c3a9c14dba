"""Scoring functions for RewardPool tests: exact string match, plus marker inputs that misbehave.

Markers (the response): HANG sleeps 60 s, RAISE raises, CRASH kills the worker process; for the 3-argument
`user_score` also NAN, INF, TEXT (a str), NOSCORE (a dict without score), RESERVED (a reserved metric name), TRUE
(a bool) and DICT (a dict with an extra metric). Environment
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


NAN, INF, TEXT, NOSCORE, RESERVED, TRUE, DICT = "NAN", "INF", "TEXT", "NOSCORE", "RESERVED", "TRUE", "DICT"


def user_score(response: str, ground_truth: str, extra: dict) -> object:
    """A configured reward function: ``score`` with the markers above, else {"score": match, "extra_keys": len}."""
    special = {
        NAN: float("nan"),
        INF: float("inf"),
        TEXT: "oops",
        NOSCORE: {"length": 1.0},
        RESERVED: {"score": 1.0, "failed": 2.0},
        TRUE: True,
        DICT: {"score": 0.5, "length": float(len(response))},
    }
    if response in special:
        return special[response]
    score(response, ground_truth)  # HANG, RAISE, CRASH
    return {"score": 1.0 if response == ground_truth else 0.0, "extra_keys": float(len(extra))}


NOT_CALLABLE = 42
