"""The paper's math reward: Math-Verify with the gold answer wrapped in ``\\boxed{}``.

Scoring follows VeRL's ``verl/utils/reward_score/math_verify.py`` (the reference code of SPEED-RL):
the gold answer is parsed as LaTeX from ``\\boxed{ground_truth}``, the response is parsed as an
expression or as LaTeX, and any exception or Math-Verify timeout scores 0.

Math-Verify enforces its own timeouts with ``signal.alarm``, which works only in the main thread of a
process. Call :func:`score_math` from the main thread of a worker process (``RewardPool`` does); its
internal timeouts are not a real time limit (see ``pool.py`` for that). Importing this module costs
about a second (sympy); the parent process of a ``RewardPool`` never imports it.
"""

import logging

from math_verify.errors import TimeoutException
from math_verify.metric import math_metric
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

# Math-Verify logs a warning for every response without an extractable answer: far too chatty for RL.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_VERIFY = math_metric(
    gold_extraction_target=(LatexExtractionConfig(),),
    pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
)


def score_math(response: str, ground_truth: str) -> float:
    """Return 1.0 if ``response`` states an answer equal to ``ground_truth``, else 0.0.

    ``ground_truth`` is a bare LaTeX answer (``"\\frac{1}{2}"``, ``"42"``); an unparseable ground truth,
    any other exception, and Math-Verify's own timeout (a ``BaseException``) all score 0.0.
    """
    try:
        score, _ = _VERIFY(["\\boxed{" + ground_truth + "}"], [response])
    except (Exception, TimeoutException):
        return 0.0
    return float(score)
