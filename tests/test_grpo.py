"""grpo.py: group advantages (equal rewards, G = 2, Dr. GRPO), grpo_loss against the formula for every
aggregation with clip-higher checked on both sides and masked tokens left out, the KL term's gradient made exact
(the expected gradient of k3 in the loss is that of the forward KL, k2's that of the reverse KL), the
ratio being exactly 1 on the first inner step, learning on the tiny model, 2 gloo processes vs 1, kill
and --resume, bad input.

    python -m pytest tests/test_grpo.py
"""

import math

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, read_metrics, tiny_reward_model

import common
import grpo

# ───────────── advantages ─────────────


def test_group_advantages_by_hand_with_equal_groups_and_g_2():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second all equal
    adv = grpo.group_advantages(r, 4)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert adv[4:].tolist() == [0.0] * 4 and torch.isfinite(adv).all()
    assert grpo.group_advantages(r, 4, scale="none")[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    g2 = grpo.group_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), 2)  # G = 2: ±1/√2 (std of two values), or 0
    assert g2.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0])


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, -7.7])
def test_an_all_equal_group_gets_exactly_zero_advantage_whatever_its_float_rounding(value, scale):
    """fp32 leaves r − mean ≈ 2e-8 for [0.1] × 8, and std = 0 clamped to 1e-6 would turn it into ±0.02."""
    adv = grpo.group_advantages(torch.full((8,), value), 8, scale=scale)
    assert adv.tolist() == [0.0] * 8


# ───────────── the loss ─────────────


def formula(logp, old, ref, adv, mask, lo, hi, beta, agg):
    """grpo_loss written out token by token in float64 Python."""
    rows = []
    for i in range(len(adv)):
        row = []
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - lo), 1 + hi)
            log_r = ref[i][t] - logp[i][t]
            row.append(-min(rho * adv[i], clipped * adv[i]) + beta * (math.exp(log_r) - 1 - log_r))
        rows.append(row)
    if agg == "token":
        return sum(map(sum, rows)) / max(sum(map(len, rows)), 1)
    if agg == "sequence":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    return sum(map(sum, rows)) / (len(mask) * len(mask[0]))


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
def test_grpo_loss_matches_the_formula_for_each_aggregation(agg):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 9
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[2] = False  # an empty answer (all masked)
    args = (logp, old, ref, adv, mask, 0.2, 0.28, 0.04, agg)
    loss, _ = grpo.grpo_loss(*args)
    assert loss.item() == pytest.approx(formula(*(x.tolist() if torch.is_tensor(x) else x for x in args)), rel=1e-10)
    # what masked tokens hold changes nothing
    noisy = logp.masked_fill(~mask, 123.0)
    assert grpo.grpo_loss(noisy, old, ref, adv, mask, 0.2, 0.28, 0.04, agg)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    x = logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: grpo.grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, agg)[0], (x,))


def test_clip_higher_is_asymmetric_on_both_sides():
    def grad(rho, adv):
        logp = torch.tensor([[math.log(rho)]], dtype=torch.float64, requires_grad=True)
        loss, st = grpo.grpo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), None, torch.tensor([adv], dtype=torch.float64),
                                  torch.ones(1, 1), 0.2, 0.28, 0.0)  # fmt: skip
        loss.backward()
        return logp.grad.item(), st

    assert grad(1.25, 1.0)[0] != 0.0  # above 1 + ε_low but below 1 + ε_high: still pushed up (clip-higher)
    g, st = grad(1.30, 1.0)
    assert g == 0.0 and st["clip_frac_high"] == 1.0 and st["clip_frac_low"] == 0.0  # above 1 + ε_high: clipped
    g, st = grad(0.75, -1.0)
    assert g == 0.0 and st["clip_frac_low"] == 1.0  # below 1 − ε_low with A < 0: clipped
    assert grad(0.85, -1.0)[0] != 0.0  # inside the low bound: pushed down
    assert grad(0.5, 1.0)[0] != 0.0 and grad(2.0, -1.0)[0] != 0.0  # min() keeps the pessimistic unclipped side


def test_k3_term_is_zero_when_the_policy_is_the_reference():
    logp = -torch.rand(3, 5, dtype=torch.float64)
    _, st = grpo.grpo_loss(logp, logp, logp, torch.zeros(3, dtype=torch.float64), torch.ones(3, 5), 0.2, 0.2, 0.5)
    assert st["kl"].item() == 0.0


def test_seed_9_4_2_k3_in_the_loss_follows_the_forward_kl_and_k2_the_reverse_kl():
    # a 5-token categorical policy π_θ = softmax(θ); expectations over a ~ π computed exactly by enumeration
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    p = logp.exp().detach()  # sampling probabilities: no gradient through the sampling

    def expected_grad(estimator):
        return torch.autograd.grad((p * estimator(logp, ref)).sum(), theta, retain_graph=True)[0]

    forward_kl = (ref.exp() * (ref - logp)).sum()  # KL(π_ref ‖ π)
    reverse_kl = (logp.exp() * (logp - ref)).sum()  # KL(π ‖ π_ref)
    grad_fwd = torch.autograd.grad(forward_kl, theta, retain_graph=True)[0]
    grad_rev = torch.autograd.grad(reverse_kl, theta, retain_graph=True)[0]
    torch.testing.assert_close(expected_grad(common.kl_k3), grad_fwd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected_grad(common.kl_k2), grad_rev, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad_fwd, grad_rev)  # the two really differ here


def test_distinct_2_and_completion_matrix_by_hand():
    assert common.distinct_2([[1, 2, 1, 2], [3]]) == pytest.approx(2 / 3)  # bigrams (1,2) (2,1) (1,2): 2 distinct of 3
    assert common.distinct_2([[1], []]) == 0.0  # no bigram at all
    docs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = common.collate_packed(docs)
    m = common.completion_matrix(batch["input_ids"].float(), batch, width=4)
    assert m.tolist() == [[6, 7, 0, 0], [9, 0, 0, 0]]


# ───────────── the rollout and the update on the tiny model ─────────────


def tiny_args(tmp_path, **kw):
    base = {"model": "tiny", "num_train": 16, "num_eval": 4, "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6,
            "overlong": "none", "lr": 1e-3, "save_every": 0, "output_dir": str(tmp_path / "run")}  # fmt: skip
    return grpo.Args(**{**base, **kw})


def test_old_logprobs_recorded_at_sampling_give_a_ratio_of_exactly_one(tmp_path, chatml):
    args = tiny_args(tmp_path, mu=2, temperature=0.7)
    policy = common.load_model("tiny", chatml)
    prompts = common.builtin_prompts("train", 2)
    gens, reward, _ = grpo.rollout(policy, chatml, prompts, [1, 2], args, None, torch.device("cpu"))
    samples, _ = grpo.training_samples(gens, reward, args)
    grpo.old_and_ref_logps(policy, None, samples, args, torch.device("cpu"))
    policy.train()
    for idx, batch in common.packed_batches(samples, args.max_tokens):
        logp, _ = common.answer_logps(policy, batch, args.max_new_tokens, args.temperature, entropy=True)  # the training forward
        old = torch.stack([samples[i]["old"] for i in idx])
        assert torch.equal(logp.detach(), old)  # ρ = exp(0) = 1 exactly on the first inner step
        assert (logp != 0).any()


def test_grpo_raises_the_mean_reward_of_a_learnable_reward(tmp_path, monkeypatch):
    # the reward: the share of lowercase letters in the answer (about 0.1 for the near-uniform random model)
    share = lambda t: sum(c.islower() for c in t) / max(len(t), 1)
    monkeypatch.setattr(common, "answer_scores", lambda prompts, texts, *a, **k: torch.tensor([share(t) for t in texts]))
    out = grpo.main(tiny_args(tmp_path, max_steps=25, prompts_per_step=4, group_size=8, lr=5e-3, beta=0.0, eval_every=0))
    rows = [r for r in read_metrics(out) if "reward/mean" in r]
    first, last = sum(r["reward/mean"] for r in rows[:5]) / 5, sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert all(r["clip_frac_low"] == 0 and r["clip_frac_high"] == 0 for r in rows)  # μ = 1: ρ = 1, nothing clipped


def test_filter_zero_std_and_overlong_mask_leave_answers_out(tmp_path):
    out = grpo.main(tiny_args(tmp_path, max_steps=2, filter_zero_std=True, overlong="mask"))
    rows = [r for r in read_metrics(out) if "reward/mean" in r]
    # the rule reward gives the random tiny model 0 everywhere: every group has zero std, and every answer
    # is cut off, so nothing is trained on, and the step says so instead of dividing by zero
    assert all(r["zero_std_frac"] == 1.0 and r["trained_answers"] == 0 and "grad_norm" not in r for r in rows)


def test_prompts_without_an_answer_need_a_reward_model(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    with pytest.raises(common.DataError, match="p.jsonl:1: missing field 'answer'"):
        grpo.main(tiny_args(tmp_path, data=str(path)))


# ───────────── processes: torchrun, kill and resume ─────────────


def cli(tmp_path):
    return ["--model", "tiny", "--num-train", "16", "--num-eval", "2", "--group-size", "4", "--prompts-per-step", "4",
            "--max-new-tokens", "6", "--overlong", "none", "--lr", "2e-3", "--reward-model", tiny_reward_model(tmp_path / "rm")]  # fmt: skip


def test_two_gloo_processes_sharding_the_policy_give_the_weights_of_one_process(tmp_path):
    args = cli(tmp_path) + ["--max-steps", "2", "--max-tokens", "300", "--mu", "2", "--fsdp", "--eval-every", "0"]
    check_two_processes_match_one("grpo.py", args, tmp_path, lr=2e-3)


def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path):
    check_two_processes_match_one("grpo.py", cli(tmp_path) + ["--max-steps", "3", "--max-tokens", "300"], tmp_path, lr=2e-3)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = cli(tmp_path) + ["--max-steps", "6", "--save-every", "3", "--eval-every", "0"]
    check_resume_matches_uninterrupted("grpo.py", args, tmp_path, steps=6)
