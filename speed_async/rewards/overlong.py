"""DAPO's soft overlong penalty (added to the reward of responses close to the length limit)."""


def overlong_penalty(response_length: int, max_response_length: int, buffer: int) -> float:
    """Return the DAPO soft overlong penalty, in [-1, 0].

    0 while ``response_length <= max_response_length - buffer``, then falling linearly to -1 at
    ``response_length == max_response_length``: ``min(-(len - (max - buffer)) / buffer, 0)``.
    The paper uses ``max_response_length=3072, buffer=512``.

    Raises:
        ValueError: if ``buffer`` is not in [1, max_response_length], or ``response_length`` is not in
            [0, max_response_length] (the engine never returns longer responses).
    """
    if not 0 < buffer <= max_response_length:
        raise ValueError(
            f"buffer={buffer} is invalid: allowed 1 <= buffer <= max_response_length ({max_response_length})"
        )
    if not 0 <= response_length <= max_response_length:
        raise ValueError(
            f"response_length={response_length} is invalid: allowed 0 <= response_length <= "
            f"max_response_length ({max_response_length})"
        )
    excess = response_length - (max_response_length - buffer)
    if excess <= 0:
        return 0.0
    return -excess / buffer
