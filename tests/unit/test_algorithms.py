"""Hand-derived checks of the pure tensor functions in speed_async.algorithms."""

from __future__ import annotations

import math

import pytest
import torch

from speed_async.algorithms import (
    broadcast_to_tokens,
    group_advantages,
    grpo_advantages,
    histogram_quantiles,
    importance_weights,
    kl_loss,
    log_ratio_histogram,
    low_var_kl,
    masked_mean,
    policy_loss,
    rloo_advantages,
    sequence_masked_weights,
    token_masked_weights,
    truncated_importance_weights,
)
from speed_async.algorithms.off_policy import HISTOGRAM_BIN, NUM_BINS


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- advantages


def test_rloo_hand_derived() -> None:
    # Group [1,0,0,1]: leave-one-out means are 1/3 (for a 1) and 2/3 (for a 0), so A = 1-1/3 = 2/3 and
    # 0-2/3 = -2/3; the closed form N/(N-1)·(r - mean) = 4/3·(±1/2) = ±2/3 agrees.
    # Group [1,0,0,0]: A_1 = 1 - mean(0,0,0) = 1; A_0 = 0 - mean(1,0,0) = -1/3.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    close(rloo_advantages(rewards), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1.0, -1 / 3, -1 / 3, -1 / 3]])


def test_grpo_uses_unbiased_std() -> None:
    # [1,0,0,1]: mean 1/2, deviations ±1/2, unbiased var = 4·(1/4)/3 = 1/3, std = 1/sqrt(3),
    # A = (1/2)·sqrt(3) = ±0.8660 (a biased std of 1/2 would give ±1).
    # [1,0,0,0]: mean 1/4, deviations 3/4 and -1/4, var = (9/16 + 3/16)/3 = 1/4, std = 1/2, A = 3/2, -1/2.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    s3 = math.sqrt(3) / 2
    close(grpo_advantages(rewards, eps=0.0), [[s3, -s3, -s3, s3], [1.5, -0.5, -0.5, -0.5]])
    # With the default eps = 1e-6 the values move by about A·eps/std, well inside 1e-5.
    close(grpo_advantages(rewards), [[s3, -s3, -s3, s3], [1.5, -0.5, -0.5, -0.5]], atol=1e-5)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.7, -0.3])
def test_all_equal_rewards_give_exact_zeros(value: float) -> None:
    # 16 rewards of 0.7 in float32: a naive mean/std leaves ~6e-8 of rounding in std and in r - mean, and
    # the 1e-6 eps turns that into GRPO advantages of ~0.06. Both estimators must return exactly 0.
    rewards = torch.full((2, 16), value)
    assert torch.equal(rloo_advantages(rewards), torch.zeros(2, 16))
    assert torch.equal(grpo_advantages(rewards), torch.zeros(2, 16))


def test_group_advantages_ragged() -> None:
    # SPEED group of 24 with 6 correct, RLOO: a correct response gets 1 - 5/23 = 18/23, a wrong one
    # 0 - 6/23 = -6/23. DAPO group of 16 with 8 correct, GRPO: mean 1/2, unbiased var = 16·(1/4)/15 = 4/15,
    # A = (1/2)/sqrt(4/15) = sqrt(15)/4 = ±0.9682.
    speed = torch.tensor([1.0] * 6 + [0.0] * 18)
    dapo = torch.tensor([1.0, 0.0] * 8)
    a_speed, a_dapo = group_advantages([speed, dapo], "rloo")
    close(a_speed, [18 / 23] * 6 + [-6 / 23] * 18)
    assert a_dapo.shape == (16,)
    _, a_dapo = group_advantages([speed, dapo], "grpo")
    q = math.sqrt(15) / 4
    close(a_dapo, [q, -q] * 8, atol=1e-5)


def test_advantage_errors() -> None:
    with pytest.raises(ValueError, match=r"group_size 1"):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"2-D .*got shape \(4,\)"):
        grpo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match=r"floating-point.*int64"):
        rloo_advantages(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        grpo_advantages(torch.ones(2, 4), eps=-1.0)
    with pytest.raises(ValueError, match=r"estimator must be one of \['grpo', 'rloo'\], got 'ppo'"):
        group_advantages([torch.ones(4)], "ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rewards\[1\] has group_size 1"):
        group_advantages([torch.ones(4), torch.ones(1)], "rloo")
    with pytest.raises(ValueError, match=r"rewards\[0\] must be 1-D"):
        group_advantages([torch.ones(2, 4)], "grpo")


def test_broadcast_to_tokens() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(broadcast_to_tokens(torch.tensor([0.5, -1.0]), mask), [[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"batch = 3 .*got shape \(2, 3\)"):
        broadcast_to_tokens(torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"advantages must be 1-D"):
        broadcast_to_tokens(torch.zeros(2, 1), mask)


# ---------------------------------------------------------------------------------------------- policy loss


def one_token_loss(ratio: float, adv: float, **kwargs: float) -> float:
    """Loss of a single response token with the given ratio pi_theta/pi_old and advantage."""
    logprobs = torch.tensor([[math.log(ratio)]])
    loss, _ = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), **kwargs)
    return loss.item()


@pytest.mark.parametrize(
    ("ratio", "adv", "kwargs", "expected"),
    [
        # A=+1, ratio 1.5: pg1 = -1.5, pg2 = -clip(1.5, 0.8, 1.2) = -1.2, max = -1.2 (clipped).
        (1.5, 1.0, {}, -1.2),
        # Same with clip-higher 0.28 (DAPO): pg2 = -1.28 > -1.5.
        (1.5, 1.0, {"clip_high": 0.28}, -1.28),
        # A=+1, ratio 0.5: pg1 = -0.5, pg2 = -0.8, max = -0.5 (the unclipped branch).
        (0.5, 1.0, {}, -0.5),
        # A=-1, ratio 20: pg1 = 20, pg2 = 1.2, max = 20, dual clip min(20, 1·10) = 10.
        (20.0, -1.0, {}, 10.0),
        # Same with c = 3: min(20, 3) = 3.
        (20.0, -1.0, {"clip_c": 3.0}, 3.0),
        # A=-1, ratio 5: max(5, 1.2) = 5 < 10, the dual clip does not bite.
        (5.0, -1.0, {}, 5.0),
        # A=-1, ratio 0.5: pg1 = 0.5, pg2 = clip(0.5)=0.8 -> 0.8 (clipped).
        (0.5, -1.0, {}, 0.8),
        # A=-2, ratio 0.9 inside the band: pg1 = pg2 = 1.8.
        (0.9, -2.0, {}, 1.8),
    ],
)
def test_policy_loss_clip_cases(ratio: float, adv: float, kwargs: dict, expected: float) -> None:
    assert one_token_loss(ratio, adv, **kwargs) == pytest.approx(expected, abs=1e-5)


def four_case_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: (ratio, A) = (1.5,+1), (0.5,+1), (20,-1), (0.5,-1) and a padded token with absurd values;
    row 1: padding only."""
    ratios = torch.tensor([[1.5, 0.5, 20.0, 0.5, 1e6], [1e6, 1e6, 1e6, 1e6, 1e6]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0], [-50.0] * 5])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0] * 5])
    old = torch.full((2, 5), -3.0)
    return ratios.log() + old, old, adv, mask


def test_policy_loss_stats_and_masking() -> None:
    logprobs, old, adv, mask = four_case_batch()
    loss, stats = policy_loss(logprobs, old, adv, mask)
    # Per-token losses -1.2, -0.5, 10, 0.8 (see the clip cases); token mean = 9.1/4 = 2.275. The padded
    # tokens (huge ratio and advantages) must not change it.
    assert loss.item() == pytest.approx(2.275, abs=1e-5)
    # Clipped branch (pg2 > pg1) taken on tokens 1 and 4 -> 2/4; dual clip only on token 3 -> 1/4.
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["dual_clipfrac"].item() == pytest.approx(0.25)
    # ratio_mean = (1.5 + 0.5 + 20 + 0.5)/4 = 5.625.
    assert stats["ratio_mean"].item() == pytest.approx(5.625, rel=1e-5)
    # approx_kl = mean of 0.5·ln(ratio)^2 = 0.5·(0.16440 + 0.48045 + 8.97441 + 0.48045)/4 = 1.26247.
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 20.0, 0.5)) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())


def test_gradient_flows_only_through_logprobs() -> None:
    logprobs, old, adv, mask = four_case_batch()
    logprobs.requires_grad_(True)
    old.requires_grad_(True)
    adv.requires_grad_(True)
    is_weights = torch.ones(2, 5, requires_grad=True)
    loss, _ = policy_loss(logprobs, old, adv, mask, is_weights=is_weights)
    loss.backward()
    assert old.grad is None and adv.grad is None and is_weights.grad is None
    # Only token 2 (ratio 0.5, A=+1) is on an unclipped branch: d(-A·ratio)/dlogp = -ratio = -0.5, divided
    # by the 4 tokens of the mean -> -0.125. Clipped, dual-clipped and padded tokens get exactly 0.
    expected = torch.zeros(2, 5)
    expected[0, 1] = -0.125
    torch.testing.assert_close(logprobs.grad, expected)


def test_extreme_log_ratio_gives_finite_gradient() -> None:
    # log ratio 100 overflows exp() in float32; with A=+1 the loss is the clipped -1.2 and with A=-1 the
    # dual cap 10, and the gradient must be 0, not NaN.
    logprobs = torch.tensor([[100.0, 100.0]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 10.0) / 2, abs=1e-5)
    assert torch.equal(logprobs.grad, torch.zeros(1, 2))


def test_normalizer_contract_sums_micro_batches_to_global_token_mean() -> None:
    # Ratio 1 everywhere, so each token's loss is -A. Micro-batch 1: 3 tokens with A=+1 (loss -1 each);
    # micro-batch 2: 1 token (of 3, the rest padding) with A=-1 (loss +1). Global token mean over the
    # 4 tokens = (-3 + 1)/4 = -0.5. Passing normalizer=4 to each call: -3/4 + 1/4 = -0.5. Averaging per
    # micro-batch instead gives mean(-1, +1) = 0: the lone token of micro-batch 2 would weigh 3x as much.
    lp1 = torch.zeros(1, 3, requires_grad=True)
    lp2 = torch.zeros(1, 3, requires_grad=True)
    adv1, mask1 = torch.ones(1, 3), torch.ones(1, 3)
    adv2, mask2 = torch.tensor([[-1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    total_tokens = (mask1.sum() + mask2.sum()).item()
    l1, _ = policy_loss(lp1, torch.zeros(1, 3), adv1, mask1, normalizer=total_tokens)
    l2, _ = policy_loss(lp2, torch.zeros(1, 3), adv2, mask2, normalizer=total_tokens)
    (l1 + l2).backward()
    assert (l1 + l2).item() == pytest.approx(-0.5)

    big = torch.zeros(2, 3, requires_grad=True)
    l_big, _ = policy_loss(big, torch.zeros(2, 3), torch.cat([adv1, adv2]), torch.cat([mask1, mask2]))
    l_big.backward()
    assert l_big.item() == pytest.approx(-0.5)
    # Same gradients too: d(-A·ratio)/dlogp / 4 = -A/4 -> -0.25 on micro-batch 1, +0.25 on its one token.
    torch.testing.assert_close(torch.cat([lp1.grad, lp2.grad]), big.grad)
    close(big.grad, [[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]])

    per_micro = [policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), a, m)[0] for a, m in [(adv1, mask1), (adv2, mask2)]]
    assert ((per_micro[0] + per_micro[1]) / 2).item() == pytest.approx(0.0)


def test_is_weights_scale_per_token_loss() -> None:
    # Ratio 1, A=+1: per-token loss -1; weights 2 and 0.5 -> -2 and -0.5, mean -1.25.
    loss, stats = policy_loss(
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.ones(1, 2),
        torch.ones(1, 2),
        is_weights=torch.tensor([[2.0, 0.5]]),
    )
    assert loss.item() == pytest.approx(-1.25)
    # Ratio 1 is inside the band: pg1 == pg2, which counts as neither clipped nor dual-clipped.
    assert stats["clipfrac"].item() == 0.0 and stats["dual_clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["approx_kl"].item() == 0.0


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3)/3
    assert masked_mean(x, mask, normalizer=12).item() == pytest.approx(0.5)  # 6/12
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0  # empty mask: 0, not NaN
    with pytest.raises(ValueError, match=r"normalizer must be > 0.*got 0"):
        masked_mean(x, mask, normalizer=0)


def test_policy_loss_errors() -> None:
    lp, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 4\) but logprobs has shape \(2, 3\)"):
        policy_loss(lp, torch.zeros(2, 4), lp, m)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\) but logprobs has shape \(2, 3\)"):
        policy_loss(lp, lp, lp, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"is_weights has shape \(2,\)"):
        policy_loss(lp, lp, lp, m, is_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"logprobs must be 2-D .*got shape \(3,\)"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    for bad_c in (1.0, 0.5):
        with pytest.raises(ValueError, match=rf"clip_c .* must be > 1, got {bad_c}"):
            policy_loss(lp, lp, lp, m, clip_c=bad_c)
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\), got 1.0"):
        policy_loss(lp, lp, lp, m, clip_low=1.0)
    with pytest.raises(ValueError, match=r"clip_high must be >= 0, got -0.1"):
        policy_loss(lp, lp, lp, m, clip_high=-0.1)


# ---------------------------------------------------------------------------------------------- KL, TIS


def test_low_var_kl_hand_computed() -> None:
    # d = ref - logp. d = ln 2: 2 - ln 2 - 1 = 0.306853; d = -ln 2: 1/2 + ln 2 - 1 = 0.193147; d = 0: 0;
    # d = 30: e^30 - 31 clamps to 10.
    ln2 = math.log(2)
    logprobs = torch.tensor([[0.0, ln2, -1.0, 0.0]])
    ref = torch.tensor([[ln2, 0.0, -1.0, 30.0]])
    close(low_var_kl(logprobs, ref), [[1 - ln2, ln2 - 0.5, 0.0, 10.0]])


def test_kl_loss_value_and_gradient() -> None:
    # Tokens 1 and 2 as above: (1 - ln2 + ln2 - 1/2)/2 = 0.25; token 3 (d = 30) is masked out.
    # d k3 / d logp = 1 - e^d: 1 - 2 = -1 and 1 - 1/2 = 1/2, divided by the 2 tokens -> -0.5, 0.25.
    ln2 = math.log(2)
    logprobs = torch.tensor([[0.0, ln2, 0.0]], requires_grad=True)
    ref = torch.tensor([[ln2, 0.0, 30.0]], requires_grad=True)
    loss = kl_loss(logprobs, ref, torch.tensor([[1.0, 1.0, 0.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(0.25)
    close(logprobs.grad, [[-0.5, 0.25, 0.0]])
    assert ref.grad is None
    # With the clamp at 10 active, the gradient is 0 (not NaN) even where exp(d) would overflow.
    lp = torch.zeros(1, 1, requires_grad=True)
    kl_loss(lp, torch.full((1, 1), 200.0), torch.ones(1, 1)).backward()
    assert torch.equal(lp.grad, torch.zeros(1, 1))
    assert kl_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4), normalizer=8).item() == 0.0
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(1, 2\) but logprobs has shape \(1, 3\)"):
        low_var_kl(torch.zeros(1, 3), torch.zeros(1, 2))


def test_truncated_importance_weights() -> None:
    # pi_old/pi_behaviour = 0.5/0.25 = 2 -> capped at 1.5; 0.25/0.5 = 0.5 stays; equal -> 1;
    # a difference of 200 in log space overflows exp() to inf and still caps at 1.5.
    old = torch.tensor([[math.log(0.5), math.log(0.25), -1.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[math.log(0.25), math.log(0.5), -1.0, -200.0]])
    w = truncated_importance_weights(old, behaviour, cap=1.5)
    close(w, [[1.5, 0.5, 1.0, 1.5]])
    assert not w.requires_grad
    # cap = 1 is allowed: weights never exceed 1.
    close(truncated_importance_weights(old, behaviour, cap=1.0), [[1.0, 0.5, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"cap .* must be >= 1, got 0.9"):
        truncated_importance_weights(old, behaviour, cap=0.9)
    with pytest.raises(ValueError, match=r"behaviour_logprobs has shape \(4,\) but old_logprobs has shape"):
        truncated_importance_weights(old, torch.zeros(4), cap=2.0)


# ---------------------------------------------------------------------------------------------- MIS, IcePop


def test_sequence_masked_weights_use_the_geometric_mean_and_mask_whole_responses() -> None:
    # log rho per token (old - behaviour), band [0.8, 1.25]:
    # row 0: 0.1, -0.1, 0.3 (and padding 5.0): mean 0.3/3 = 0.1, g = e^0.1 = 1.10517 -> kept, every token 1.10517.
    # row 1: 0.4, 0.4 (padding 0, 0): mean 0.4, g = e^0.4 = 1.49182 > 1.25 -> the whole response masked (0).
    # row 2: -0.3, -0.2 (padding): mean -0.25, g = e^-0.25 = 0.77880 < 0.8 -> masked.
    # row 3: padding only: g = e^0 = 1 (inside the band; the loss mask removes it anyway).
    # A single token of ratio e^0.3 = 1.35 (outside the band) does not mask row 0: the mean does.
    log_rho = torch.tensor([[0.1, -0.1, 0.3, 5.0], [0.4, 0.4, 0.0, 0.0], [-0.3, -0.2, 0.0, 0.0], [0.0] * 4])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    old = torch.full((4, 4), -2.0, requires_grad=True)
    behaviour = old.detach() - log_rho
    w = sequence_masked_weights(old, behaviour, mask, 0.8, 1.25)
    g = math.exp(0.1)
    close(w, [[g] * 4, [0.0] * 4, [0.0] * 4, [1.0] * 4], atol=1e-5)
    assert not w.requires_grad
    # A wider band keeps row 1 (1.49 <= 1.5) and row 2 (0.7788 >= 0.7).
    w = sequence_masked_weights(old, behaviour, mask, 0.7, 1.5)
    close(w[1:3, 0], [math.exp(0.4), math.exp(-0.25)], atol=1e-5)
    with pytest.raises(ValueError, match=r"MIS band \[1.1, 2.0\] is invalid"):
        sequence_masked_weights(old, behaviour, mask, 1.1, 2.0)


def test_token_masked_weights_keep_the_ratio_inside_the_band_only() -> None:
    # IcePop band [0.5, 5]: rho = 2 -> 2; 0.5 (the edge) -> 0.5; 0.4 -> masked 0; 5 (edge) -> 5; 6 -> 0;
    # a log ratio of 200 (exp overflows) -> masked 0, not NaN.
    rho = torch.tensor([[2.0, 0.5, 0.4, 5.0, 6.0]])
    behaviour = torch.full((1, 5), -3.0)
    old = behaviour + rho.log()
    w = token_masked_weights(old, behaviour, 0.5, 5.0)
    close(w, [[2.0, 0.5, 0.0, 5.0, 0.0]], atol=1e-5)
    close(token_masked_weights(torch.tensor([[0.0]]), torch.tensor([[-200.0]]), 0.5, 5.0), [[0.0]])
    with pytest.raises(ValueError, match=r"IcePop band \[0.5, 0.9\] is invalid"):
        token_masked_weights(old, behaviour, 0.5, 0.9)


def test_importance_weights_dispatches_each_correction() -> None:
    # rho = 3 on one token: none -> no weights; tis (cap 2) -> 2; icepop [0.5, 5] -> 3; mis (one-token response,
    # g = 3) -> masked by [0.8, 1.25] -> 0.
    old, behaviour, mask = torch.tensor([[math.log(3.0)]]), torch.zeros(1, 1), torch.ones(1, 1)
    assert importance_weights("none", old, behaviour, mask) is None
    close(importance_weights("tis", old, behaviour, mask, tis_cap=2.0), [[2.0]], atol=1e-6)
    close(importance_weights("icepop", old, behaviour, mask), [[3.0]], atol=1e-5)
    close(importance_weights("mis", old, behaviour, mask), [[0.0]])
    with pytest.raises(ValueError, match=r"correction must be one of \['none', 'tis', 'mis', 'icepop'\]"):
        importance_weights("gspo", old, behaviour, mask)  # type: ignore[arg-type]


def test_masked_tokens_contribute_nothing_but_keep_their_place_in_the_token_mean() -> None:
    # Ratio 1 (pi_theta = pi_old), A = +1: per-token loss -1. IcePop weights [1, 0] (second token masked):
    # sum = -1, divided by both tokens -> -0.5 (not -1: the masked token stays in the denominator).
    loss, _ = policy_loss(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), is_weights=torch.tensor([[1.0, 0.0]])
    )
    assert loss.item() == pytest.approx(-0.5)


def test_log_ratio_histogram_and_quantiles() -> None:
    # 100 response tokens with log rho = (i - 50) / 1000, i = 0..99 (-0.05 .. +0.049): exactly one per bin of
    # width 1e-3. p1 is the first bin whose count reaches 0.01 * 100 = 1: log rho -0.05 -> e^-0.05 = 0.951229;
    # p50: the 50th value, log rho -0.001 -> 0.999000; p99: the 99th, log rho 0.048 -> 1.049171. A padding
    # token (log rho 7) is not counted; a token at log rho -100 lands in the first bin (-8).
    log_rho = torch.tensor([(i - 50) / 1000 for i in range(100)] + [7.0]).double()
    mask = torch.ones(1, 101)
    mask[0, 100] = 0
    old = torch.zeros(1, 101, dtype=torch.float64)
    histogram = log_ratio_histogram(old, -log_rho[None], mask)
    assert histogram.shape == (NUM_BINS,) and histogram.sum().item() == 100 and histogram.max().item() == 1
    p1, p50, p99 = histogram_quantiles(histogram, (0.01, 0.5, 0.99))
    assert p1 == pytest.approx(math.exp(-0.05), abs=1e-9)
    assert p50 == pytest.approx(math.exp(-0.001), abs=1e-9)
    assert p99 == pytest.approx(math.exp(0.048), abs=1e-9)
    # Histograms add up: two halves give the same quantiles as the whole.
    a = log_ratio_histogram(old[:, :50], -log_rho[None, :50], mask[:, :50])
    b = log_ratio_histogram(old[:, 50:], -log_rho[None, 50:], mask[:, 50:])
    assert histogram_quantiles(a + b, (0.01, 0.5, 0.99)) == [p1, p50, p99]
    far = log_ratio_histogram(torch.zeros(1, 1), torch.full((1, 1), 100.0), torch.ones(1, 1))
    assert far[0].item() == 1 and histogram_quantiles(far, (0.5,))[0] == pytest.approx(math.exp(-8.0))
    assert math.isnan(histogram_quantiles(torch.zeros(NUM_BINS, dtype=torch.float64), (0.5,))[0])
    assert HISTOGRAM_BIN == 1e-3
