"""rloo_remax.py: RLOO advantages against the leave-one-out mean computed by a loop (and summing to zero
in each group), ReMax advantages, the variance and unbiasedness of RLOO on a toy bandit against plain
REINFORCE and the exact gradient, learning on the tiny model for both estimators, 2 gloo processes vs
1, kill and --resume.

    python -m pytest tests/test_rloo_remax.py
"""

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, read_metrics, tiny_reward_model

import common
import rloo_remax


def test_rloo_advantages_match_a_leave_one_out_loop_and_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(0)
    for group in (2, 3, 8):
        r = torch.randn(5 * group, generator=g, dtype=torch.float64)
        adv = rloo_remax.rloo_advantages(r, group)
        for i in range(len(r)):
            start = i // group * group
            others = [r[j].item() for j in range(start, start + group) if j != i]
            assert adv[i].item() == pytest.approx(r[i].item() - sum(others) / len(others), rel=1e-12, abs=1e-12)
        assert adv.view(-1, group).sum(1).abs().max().item() < 1e-12
    assert rloo_remax.rloo_advantages(torch.ones(4), 4).tolist() == [0.0] * 4  # all equal: no signal, no NaN
    with pytest.raises(ValueError, match="at least 2"):
        rloo_remax.rloo_advantages(torch.ones(3), 1)


def test_remax_advantage_is_the_sample_reward_minus_the_greedy_reward():
    adv = rloo_remax.remax_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert adv.tolist() == [0.0, -1.0, 1.0]


def test_reinforce_loss_gradient_is_minus_advantage_times_the_score():
    seq = torch.tensor([-3.0, -1.0], requires_grad=True)
    adv = torch.tensor([2.0, -0.5], requires_grad=True)
    rloo_remax.reinforce_loss(seq, adv).sum().backward()
    assert seq.grad.tolist() == [-2.0, 0.5] and adv.grad is None  # the advantage is a constant


@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, -7.7])
def test_an_all_equal_group_gets_exactly_zero_rloo_advantage(value):
    assert rloo_remax.rloo_advantages(torch.full((8,), value), 8).tolist() == [0.0] * 8


def test_rloo_is_unbiased_and_has_lower_variance_than_reinforce_on_a_bandit():
    # a 5-armed bandit with a softmax policy; the exact gradient of E[r] is Σ_a r(a) ∇π(a)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64)
    reward = torch.tensor([1.0, 0.2, 0.5, 0.9, 0.0], dtype=torch.float64) + 3.0  # a large offset: REINFORCE's weak spot
    p = torch.softmax(theta, 0)
    exact = p * (reward - (p * reward).sum())  # ∂E[r]/∂θ_k = π_k (r_k − E[r])
    trials, group = 20000, 4
    arms = torch.multinomial(p.expand(trials * group, 5), 1, replacement=True, generator=g).view(trials, group)
    r = reward[arms]  # (trials, G)
    score = torch.nn.functional.one_hot(arms, 5).double() - p  # ∇_θ log π(a) = e_a − π
    reinforce = (r[..., None] * score).mean(1)  # (trials, 5): one estimate per trial
    adv = rloo_remax.rloo_advantages(r.reshape(-1), group).view(trials, group)
    rloo = (adv[..., None] * score).mean(1)
    se = rloo.std(0) / trials**0.5
    assert ((rloo.mean(0) - exact).abs() < 4 * se + 1e-12).all()  # unbiased, within 4 standard errors
    assert rloo.var(0).sum() < 0.1 * reinforce.var(0).sum()  # far lower variance than no baseline


@pytest.mark.parametrize("estimator", ["rloo", "remax"])
def test_each_estimator_raises_the_mean_reward_of_a_learnable_reward(tmp_path, monkeypatch, estimator):
    share = lambda t: sum(c.islower() for c in t) / max(len(t), 1)
    monkeypatch.setattr(common, "answer_scores", lambda prompts, texts, *a, **k: torch.tensor([share(t) for t in texts]))
    args = rloo_remax.Args(model="tiny", estimator=estimator, num_train=16, num_eval=2, group_size=8, prompts_per_step=4,
                           max_new_tokens=6, max_steps=25, lr=1e-2, beta=0.0, eval_every=0, save_every=0,
                           output_dir=str(tmp_path / estimator))  # fmt: skip
    rows = [r for r in read_metrics(rloo_remax.main(args)) if "reward/mean" in r]
    first, last = sum(r["reward/mean"] for r in rows[:5]) / 5, sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)


def cli(tmp_path, estimator):
    return ["--model", "tiny", "--estimator", estimator, "--num-train", "16", "--num-eval", "2", "--group-size", "4",
            "--prompts-per-step", "4", "--max-new-tokens", "6", "--lr", "2e-3", "--reward-model", tiny_reward_model(tmp_path / "rm")]  # fmt: skip


def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path):
    check_two_processes_match_one(
        "rloo_remax.py", cli(tmp_path, "rloo") + ["--max-steps", "3", "--max-tokens", "300"], tmp_path, lr=2e-3
    )


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = cli(tmp_path, "remax") + ["--max-steps", "6", "--save-every", "3", "--eval-every", "0"]
    check_resume_matches_uninterrupted("rloo_remax.py", args, tmp_path, steps=6)
