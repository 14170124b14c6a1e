"""grpo.py: group advantages (equal rewards, G = 2, Dr. GRPO), grpo_loss against the formula for every
aggregation with clip-higher checked on both sides and masked tokens left out, the KL term's gradient made exact
(the expected gradient of k3 in the loss is that of the forward KL, k2's that of the reverse KL), the
ratio being exactly 1 on the first inner step, learning on the tiny model, 2 gloo processes vs 1, kill
and --resume, bad input.

    python -m pytest tests/test_grpo.py
"""

import math
import statistics

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


def test_batch_scale_divides_by_the_std_of_every_reward_of_the_step():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = statistics.stdev(r.tolist())  # over all 8 rewards, not per group
    adv = grpo.group_advantages(r, 4, scale="batch")
    assert adv.tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0, 0, 0])
    assert grpo.group_advantages(r, 4, "batch", batch_std=2.0)[:4].tolist() == [0.25, -0.25, -0.25, 0.25]  # other ranks' std


@pytest.mark.parametrize("scale", ["std", "none", "batch"])
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


def random_batch(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[1, 1:] = False  # a one-token answer next to long ones
    return logp, old, ref, torch.randn(b, generator=g, dtype=torch.float64), mask


def test_gspo_is_the_sequence_level_clipped_objective_of_its_paper():
    """GSPO (arXiv:2507.18071 eq. 5, 7): s_i = (π(y_i)/π_old(y_i))^(1/|y_i|), loss = −mean_i min(s_i A_i,
    clip(s_i, 1 − ε_l, 1 + ε_h) A_i), written per answer with Python floats; value and gradient."""
    logp, old, _, adv, mask = random_batch()
    lo, hi = 3e-4, 4e-4

    def paper(lp):
        terms = []
        for i in range(len(adv)):
            n = int(mask[i].sum())
            if n == 0:
                terms.append(lp.sum() * 0)
                continue
            s_i = torch.exp((lp[i][mask[i]] - old[i][mask[i]]).sum() / n)  # the geometric mean of token ratios
            terms.append(-torch.min(s_i * adv[i], s_i.clamp(1 - lo, 1 + hi) * adv[i]))
        return torch.stack(terms).mean()

    x = logp.clone().requires_grad_()
    ours, _ = grpo.grpo_loss(x, old, None, adv, mask, lo, hi, 0.0, "sequence", level="sequence")
    y = logp.clone().requires_grad_()
    expected = paper(y)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    ours.backward(), expected.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    # where it differs from GRPO: a token's ratio far out of range clips the token there, but only moves the
    # long answer's geometric mean by 1/|y|
    tok, _ = grpo.grpo_loss(logp, old, None, adv, mask, lo, hi, 0.0, "sequence")
    assert abs(tok.item() - ours.item()) > 1e-3


def test_cispo_keeps_the_gradient_of_clipped_tokens_with_a_constant_clipped_weight():
    """MiniMax-M1 (arXiv:2506.13585 eq. 4): ℓ_t = −sg(clip(ρ_t, 1 − ε_l, 1 + ε_h)) A log π_t, so dℓ_t/dlogp_t =
    −clip(ρ_t) A, nonzero even where ρ_t is clipped (there PPO's clipped surrogate gives exactly 0)."""
    logp, old, _, adv, mask = random_batch(1)
    lo, hi = 1.0, 0.28
    x = logp.clone().requires_grad_()
    loss, _ = grpo.grpo_loss(x, old, None, adv, mask, lo, hi, 0.0, "token", policy_loss="cispo")
    loss.backward()
    n = int(mask.sum())
    rho = torch.exp(logp - old)
    weight = rho.clamp(1 - lo, 1 + hi)
    assert loss.item() == pytest.approx(float(-(weight * adv[:, None] * logp)[mask].sum() / n), rel=1e-12)
    torch.testing.assert_close(x.grad, torch.where(mask, -weight * adv[:, None] / n, 0.0), rtol=1e-12, atol=0)
    clipped = mask & (rho > 1 + hi)
    assert clipped.any() and (x.grad[clipped] != 0).all()
    z = logp.clone().requires_grad_()  # the clipped surrogate: no gradient through those tokens when A > 0
    grpo.grpo_loss(z, old, None, adv, mask, 0.2, hi, 0.0, "token")[0].backward()
    assert (z.grad[clipped & (adv[:, None] > 0)] == 0).all()


def test_weighted_k3_is_unbiased_for_samples_from_the_old_policy():
    """μ = 2: the second update's samples come from π_old ≠ π. E_{a~π_old}[sg(π/π_old)·k3(a)] = KL(π‖π_ref)
    exactly (enumerated on a 6-token categorical), while the plain k3 average is off; and the gradient of
    the weighted term is β·ρ·(1 − π_ref/π) per token."""
    g = torch.Generator().manual_seed(3)
    pi, pi_old, pi_ref = (torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0) for _ in range(3))
    kl = float((pi * (pi.log() - pi_ref.log())).sum())
    logp, old, ref = pi.log()[None], pi_old.log()[None], pi_ref.log()[None]  # one "answer" whose 6 tokens are the outcomes
    weights = pi_old[None]  # E over a ~ π_old = Σ_a π_old(a) · (...): as a token-weighted mean with these weights
    _, st = grpo.grpo_loss(logp, old, ref, torch.zeros(1, dtype=torch.float64), weights > 0, 0.2, 0.28, 1.0, kl_weighted=True)
    per_token = torch.exp(logp - old) * common.kl_k3(logp, ref)
    assert float((weights * per_token).sum()) == pytest.approx(kl, rel=1e-12)
    assert abs(float((weights * common.kl_k3(logp, ref)).sum()) - kl) > 1e-3  # unweighted: biased under π_old
    assert st["kl"].item() == pytest.approx(float(per_token.mean()), rel=1e-12)  # the logged term is the weighted one
    x = logp.clone().requires_grad_()
    grpo.grpo_loss(x, old, ref, torch.zeros(1, dtype=torch.float64), weights > 0, 0.2, 0.28, 0.5, kl_weighted=True)[0].backward()
    rho, r = torch.exp(logp - old), torch.exp(ref - logp)
    torch.testing.assert_close(x.grad, 0.5 * rho * (1 - r) / 6, rtol=1e-12, atol=0)


@pytest.mark.parametrize("log_r", [1e-3, 1e-5, 1e-7, -1e-6])
def test_k3_keeps_its_digits_when_the_log_ratio_is_tiny(log_r):
    """k3 = expm1(x) − x ≈ x²/2: in float32 the plain (e^x − 1) − x cancels to noise for |x| ≲ 1e-4."""
    truth = math.expm1(log_r) - log_r  # float64
    logp = torch.zeros(1, dtype=torch.float32)
    ours = common.kl_k3(logp, torch.tensor([log_r], dtype=torch.float32)).item()
    assert ours == pytest.approx(truth, rel=1e-3)
    if abs(log_r) <= 1e-5:
        x = torch.tensor(log_r, dtype=torch.float32)
        assert abs(((torch.exp(x) - 1) - x).item() - truth) > 10 * truth  # the naive form is wrong here


def test_clip_range_and_aggregation_defaults_follow_the_chosen_loss():
    pick = lambda **kw: tuple(grpo.loss_defaults(grpo.Args(**kw)).values())  # noqa: E731
    assert pick() == (0.2, 0.28, "token")
    assert pick(importance_level="sequence") == (3e-4, 4e-4, "sequence")  # GSPO eq. 5: a mean over answers
    assert pick(importance_level="sequence", loss_agg="token") == (3e-4, 4e-4, "token")
    assert pick(policy_loss="cispo") == (1.0, 0.28, "token")
    assert pick(policy_loss="cispo", clip_high=4.0) == (1.0, 4.0, "token")


def test_on_policy_gspo_and_cispo_take_grpos_step_so_they_differ_only_from_the_second_update():
    """At μ = 1 every ratio is 1 and nothing is clipped: ∇s_i = (1/|y_i|) Σ_t ∇log π_t, so GSPO's gradient is
    GRPO's with the same aggregation (with token averaging, the 1/|y_i| cancels against |y_i| tokens), and
    CISPO's −A·∇log π_t is the clipped surrogate's A·∇ρ_t. What a validated run of either shows at μ = 1 is
    its aggregation, not its ratio."""
    logp, _, _, adv, mask = random_batch(2)

    def grad(agg, **kw):
        x = logp.clone().requires_grad_()
        grpo.grpo_loss(x, logp, None, adv, mask, 3e-4, 4e-4, 0.0, agg, **kw)[0].backward()  # ρ = 1: in any range
        return x.grad

    grpo_kw, gspo_kw = {}, {"level": "sequence"}
    for agg in ("token", "sequence"):
        torch.testing.assert_close(grad(agg, **gspo_kw), grad(agg, **grpo_kw), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad(agg, policy_loss="cispo"), grad(agg, **grpo_kw), rtol=1e-12, atol=1e-15)
    assert (grad("token") - grad("sequence")).abs().max() > 1e-3  # the aggregation does change the step


def test_k3_in_the_loss_follows_the_forward_kl_and_k2_the_reverse_kl():
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
    for idx, batch in common.packed_batches(samples, args.max_tokens, args.share_prompt):  # the update's rows
        logp, _ = common.answer_logps(policy, batch, args.max_new_tokens, args.temperature, entropy=True)  # the training forward
        old = torch.stack([samples[i]["old"] for i in idx])
        assert torch.equal(logp.detach(), old)  # ρ = exp(0) = 1 exactly on the first inner step
        assert (logp != 0).any()


def test_the_sampler_records_the_log_prob_the_trainer_recomputes(tmp_path, chatml):
    """On CPU in fp32 the sampler's own log-probs (RowSampler) and the trainer's packed recomputation of
    log_softmax(logits / τ) agree to float rounding: the mismatch is ~0 here, and what --tis-cap and
    --mismatch-band correct for elsewhere (bf16, another inference engine)."""
    args = tiny_args(tmp_path, temperature=0.7)
    policy = common.load_model("tiny", chatml)
    gens, reward, _ = grpo.rollout(policy, chatml, common.builtin_prompts("train", 2), [1, 2], args, None, torch.device("cpu"))
    samples, _ = grpo.training_samples(gens, reward, args)
    for idx, batch in common.packed_batches(samples, args.max_tokens):
        logp, _ = common.answer_logps(policy.eval(), batch, args.max_new_tokens, args.temperature)
        for j, i in enumerate(idx):
            n = int(samples[i]["answer_mask"].sum())
            assert n == len(gens[i]["completion_ids"]) and n > 0
            torch.testing.assert_close(logp[j, :n], samples[i]["sampler"][:n], atol=2e-5, rtol=0)


def test_tis_weights_and_the_mismatch_band_for_a_sampler_perturbed_by_a_known_amount():
    """sampler = old − δ_i on answer i: π_old/π_sampler = e^δ_i on every token, so the TIS weight is
    min(e^δ_i, C) exactly and the geometric-mean ratio is e^δ_i."""
    old = -torch.rand(4, 5, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 2:] = False
    delta = torch.tensor([0.0, 0.05, -0.3, 0.3], dtype=torch.float64)
    weights, keep = grpo.sampler_correction(old, old - delta[:, None], mask, cap=1.2, band=0.1)
    expected = torch.minimum(torch.exp(delta), torch.tensor(1.2, dtype=torch.float64))[:, None].expand(4, 5)
    torch.testing.assert_close(weights[mask], expected[mask], rtol=1e-12, atol=0)
    assert keep.tolist() == [True, True, False, False]  # e^±0.3 leaves [0.9, 1.1]; e^0.05 stays
    assert grpo.sampler_correction(old, old - delta[:, None], mask, cap=0.0, band=0.0)[1].all()  # off: all kept, weight 1


def test_a_perturbed_sampler_is_measured_masked_and_reweighted_in_a_run(tmp_path, monkeypatch):
    """Every other answer's sampler log-probs are lowered by 0.2 nats a token after sampling, as a bf16
    or vLLM sampler might: the run logs that mismatch, and --mismatch-band 0.1 drops exactly those answers."""
    generate = common.generate

    def perturbed(*a, **k):
        gens = generate(*a, **k)
        for g in gens[::2]:
            if "sampler_logps" in g:  # sampled, not the greedy evaluation
                g["sampler_logps"] = [x - 0.2 for x in g["sampler_logps"]]
        return gens

    monkeypatch.setattr(common, "generate", perturbed)
    rows = [r for r in read_metrics(grpo.main(tiny_args(tmp_path, max_steps=1, mismatch_band=0.1, tis_cap=2.0, eval_every=0)))
            if "loss" in r]  # fmt: skip
    assert rows[0]["mismatch/masked_frac"] == 0.5
    assert rows[0]["mismatch/abs_mean"] < 1e-4  # what is left after masking: the unperturbed half
    rows = [r for r in read_metrics(grpo.main(tiny_args(tmp_path, max_steps=1, output_dir=str(tmp_path / "b"), eval_every=0)))
            if "loss" in r]  # fmt: skip
    assert rows[0]["mismatch/abs_max"] == pytest.approx(0.2, abs=1e-4)  # nothing masked: the perturbation is seen
    assert 0.05 < rows[0]["mismatch/abs_mean"] < 0.15 and rows[0]["mismatch/kl_seq"] < 0


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


def test_the_newer_loss_options_give_one_process_s_weights_on_two_and_resume_exactly(tmp_path):
    """--scale batch (the batch std is summed over ranks), GSPO's sequence ratio, CISPO's weight, the
    weighted k3 with μ = 2 inner updates, TIS and the mismatch band (its count is summed over ranks), all
    at once: 2 gloo processes = 1, and a killed run resumes exactly."""
    options = ["--scale", "batch", "--importance-level", "sequence", "--policy-loss", "cispo", "--kl-weighted", "--mu", "2",
               "--beta", "0.1", "--tis-cap", "2", "--mismatch-band", "0.5", "--max-tokens", "300"]  # fmt: skip
    check_two_processes_match_one("grpo.py", cli(tmp_path) + options + ["--max-steps", "3"], tmp_path / "procs", lr=2e-3)
    args = cli(tmp_path) + options + ["--max-steps", "4", "--save-every", "2", "--eval-every", "0"]
    check_resume_matches_uninterrupted("grpo.py", args, tmp_path / "resume", steps=4)
