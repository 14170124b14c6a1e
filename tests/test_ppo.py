"""ppo.py: GAE against a naive double loop (and its γλ = 0 and λ = 1 special cases), the PPO loss against
the formula on both clip branches for either sign of the advantage, value clipping, the KL penalty and
the score landing on the right tokens, the KL controller, a ratio of exactly 1 on the first minibatch,
learning on the tiny model with a bounded KL, the sft.py → rm.py → ppo.py pipeline, 2 gloo processes vs
1, kill and --resume, and bad input (another tokenizer, NaN rewards).

    python -m pytest tests/test_ppo.py
"""

import math

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, read_metrics, tiny_reward_model

import common
import ppo
import rm
import sft

# ───────────── GAE ─────────────


def naive_gae(rewards, values, lengths, gamma, lam):
    """A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l} over the answer, δ_t = r_t + γ V_{t+1} − V_t, V = 0 after the end."""
    b, t = len(rewards), len(rewards[0])
    adv = [[0.0] * t for _ in range(b)]
    for i in range(b):
        n = lengths[i]
        v = values[i][:n] + [0.0]
        delta = [rewards[i][k] + gamma * v[k + 1] - v[k] for k in range(n)]
        for k in range(n):
            adv[i][k] = sum((gamma * lam) ** j * delta[k + j] for j in range(n - k))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_a_naive_double_loop_with_masks(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, t = 5, 9
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = [9, 4, 1, 0, 6]  # a full row, short ones, and an empty answer
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    expected = torch.tensor(naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, (expected + values) * mask, rtol=1e-12, atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # what lies past an answer's end changes nothing
    noisy = ppo.compute_gae(rewards.masked_fill(~mask, 9.0), values.masked_fill(~mask, -7.0), mask, gamma, lam)
    torch.testing.assert_close(noisy[0], adv)


def test_gae_special_cases_td_and_monte_carlo():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    # γλ = 0: the one-step TD error
    adv, _ = ppo.compute_gae(r, v, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(adv, r + 0.9 * next_v - v)
    # λ = 1: the discounted Monte-Carlo return minus the value; the returns are the MC returns
    adv, ret = ppo.compute_gae(r, v, mask, gamma=0.9, lam=1.0)
    mc = torch.stack([sum(0.9**j * r[:, k + j] for j in range(6 - k)) for k in range(6)], 1)
    torch.testing.assert_close(adv, mc - v)
    torch.testing.assert_close(ret, mc)


# ───────────── the loss ─────────────


def formula(logp, old, v, old_v, ret, adv, ent, mask, eps, vf_eps, vf_coef, ent_coef):
    """ppo_loss written out token by token in float64 Python."""
    pg, vf, en, n = 0.0, 0.0, 0.0, 0
    for i in range(len(mask)):
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            pg += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            vc = old_v[i][t] + min(max(v[i][t] - old_v[i][t], -vf_eps), vf_eps)
            vf += 0.5 * max((v[i][t] - ret[i][t]) ** 2, (vc - ret[i][t]) ** 2)
            en += ent[i][t]
            n += 1
    n = max(n, 1)
    return pg / n + vf_coef * vf / n - ent_coef * en / n


def test_ppo_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    b, t = 4, 7
    r = lambda s=1.0: torch.randn(b, t, generator=g, dtype=torch.float64) * s
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old, values = logp + r(0.3), r()
    args = [logp, old, values, values + r(0.3), r(), r(), torch.rand(b, t, generator=g, dtype=torch.float64)]
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[3] = False
    loss, st = ppo.ppo_loss(*args, mask, 0.2, 0.2, 0.1, 0.01)
    expected = formula(*(x.tolist() for x in args), mask.tolist(), 0.2, 0.2, 0.1, 0.01)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    lp, vv = logp.clone().requires_grad_(), values.clone().requires_grad_()
    f = lambda lp, vv: ppo.ppo_loss(lp, old, vv, *args[3:], mask, 0.2, 0.2, 0.1, 0.01)[0]
    assert torch.autograd.gradcheck(f, (lp, vv))
    ratio = (logp - old).exp()
    assert st["clip_frac"].item() == pytest.approx((((ratio - 1).abs() > 0.2) & mask).sum().item() / mask.sum().item())


@pytest.mark.parametrize(
    "rho,adv,moves",
    [
        (1.5, 1.0, False),  # A > 0, ρ above 1 + ε: clipped, no gradient
        (0.5, 1.0, True),  # A > 0, ρ below 1 − ε: the min keeps the unclipped term, the gradient pushes ρ up
        (0.5, -1.0, False),  # A < 0, ρ below 1 − ε: clipped
        (1.5, -1.0, True),  # A < 0, ρ above 1 + ε: unclipped, pushes ρ down
        (1.1, 1.0, True),  # inside the trust region either way
        (0.9, -1.0, True),
    ],
)
def test_both_clip_branches_for_either_sign_of_the_advantage(rho, adv, moves):
    logp = torch.tensor([[math.log(rho)]], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(1, 1, dtype=torch.float64)
    loss, st = ppo.ppo_loss(
        logp, z, z, z, z, torch.tensor([[adv]], dtype=torch.float64), z, torch.ones(1, 1), 0.2, 0.2, 0.0, 0.0
    )
    loss.backward()
    clipped_value = min(max(rho, 0.8), 1.2)
    assert loss.item() == pytest.approx(-min(rho * adv, clipped_value * adv))
    if moves:
        assert logp.grad.item() == pytest.approx(-rho * adv)  # d(−ρA)/d log π = −ρA
    else:
        assert logp.grad.item() == 0.0
    assert st["clip_frac"].item() == float(abs(rho - 1) > 0.2)


def test_value_clipping_takes_the_worse_of_the_two_errors():
    def value_loss(v, old_v, ret):
        z = torch.zeros(1, 1, dtype=torch.float64)
        vt = torch.tensor([[v]], dtype=torch.float64, requires_grad=True)
        t = lambda x: torch.tensor([[x]], dtype=torch.float64)
        loss, st = ppo.ppo_loss(z, z, vt, t(old_v), t(ret), z, z, torch.ones(1, 1), 0.2, 0.2, 1.0, 0.0)
        loss.backward()
        return loss.item(), vt.grad.item(), st["vf_clip_frac"].item()

    # the new value jumped past the return: the clipped value (0.2) is further from it, so it counts, and
    # its gradient is 0 (the jump is not rewarded)
    assert value_loss(1.0, 0.0, 0.9) == pytest.approx((0.5 * 0.7**2, 0.0, 1.0))
    # the new value moved away from the return: the unclipped error is the larger one, with its gradient
    assert value_loss(-1.0, 0.0, 0.5) == pytest.approx((0.5 * 1.5**2, -1.5, 1.0))
    # a small move: both agree
    assert value_loss(0.1, 0.0, 0.5) == pytest.approx((0.5 * 0.4**2, -0.4, 0.0))


def test_kl_penalty_on_every_answer_token_and_the_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0] * 4])
    ref = torch.tensor([[-1.5, -1.0, -3.0, 9.0], [-1.0, 9.0, 9.0, 9.0], [9.0] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    r = ppo.shaped_rewards(torch.tensor([2.0, -1.0, 5.0]), logp, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0, 0.0], [-0.05 - 1.0, 0.0, 0.0, 0.0], [0.0] * 4])
    torch.testing.assert_close(r, expected)


def test_adaptive_beta_moves_towards_the_target_and_is_clipped():
    assert ppo.adaptive_beta(0.1, kl=12.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ppo.adaptive_beta(0.1, kl=5.4, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.adaptive_beta(0.1, kl=0.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


# ───────────── the loop on the tiny model ─────────────


def tiny_args(tmp_path, **kw):
    base = {"model": "tiny", "num_train": 16, "num_eval": 4, "prompts_per_step": 4, "max_new_tokens": 6, "lr": 1e-3,
            "critic_lr": 1e-3, "save_every": 0, "output_dir": str(tmp_path / "run")}  # fmt: skip
    return ppo.Args(**{**base, **kw})


def test_first_minibatch_sees_a_ratio_of_exactly_one(tmp_path, chatml):
    args = tiny_args(tmp_path, temperature=0.7)
    policy = common.load_model("tiny", chatml)
    ref, critic = common.load_model("tiny", chatml, seed=1), ppo.value_model(policy, chatml)
    prompts = common.builtin_prompts("train", 4)
    samples, _, _ = ppo.rollout(policy, chatml, prompts, [0, 1, 2, 3], [5, 6, 7, 8], args, None, 0, torch.device("cpu"))
    ppo.old_logps_and_values(policy, ref, critic, samples, args, 0, torch.device("cpu"))
    policy.train()
    for idx, batch in ppo.partition(samples, args, 0, 0)[0]:  # the update's first forward
        logp, _ = common.answer_logps(policy, batch, args.max_new_tokens, args.temperature, entropy=True)
        old = torch.stack([samples[i]["old"] for i in idx])
        assert torch.equal(logp.detach(), old) and (logp != 0).any()
    # every answer is in exactly one minibatch of every epoch
    for epoch in range(3):
        seen = sorted(i for mbatch in ppo.partition(samples, args, 0, epoch) for idx, _ in mbatch for i in idx)
        assert seen == [0, 1, 2, 3]


def test_ppo_raises_a_learnable_reward_with_a_bounded_kl(tmp_path, monkeypatch):
    # the reward: the share of lowercase letters in the answer (about 0.1 for the near-uniform random model)
    share = lambda t: sum(c.islower() for c in t) / max(len(t), 1)
    monkeypatch.setattr(common, "answer_scores", lambda prompts, texts, *a, **k: torch.tensor([share(t) for t in texts]))
    runs = {}
    for name, kl in (("free", {"beta": 0.0}), ("controlled", {"beta": 0.1, "target_kl": 3.0, "kl_horizon": 32})):
        args = tiny_args(tmp_path, max_steps=25, prompts_per_step=16, lr=3e-3, critic_lr=3e-3, eval_every=0,
                         missing_eos_penalty=0.0, output_dir=str(tmp_path / name), **kl)  # fmt: skip
        runs[name] = [r for r in read_metrics(ppo.main(args)) if "score" in r]
    last5 = lambda rows, key: sum(r[key] for r in rows[-5:]) / 5
    for rows in runs.values():
        assert last5(rows, "score") > sum(r["score"] for r in rows[:5]) / 5 + 0.15
    rows = runs["controlled"]
    # Σ_t k1 per answer: the penalty holds the drift well below that of the unpenalized run
    assert last5(rows, "kl") < 0.75 * last5(runs["free"], "kl"), (last5(rows, "kl"), last5(runs["free"], "kl"))
    assert rows[-1]["beta"] > min(r["beta"] for r in rows)  # the controller raised β once the KL passed its target
    assert last5(rows, "explained_var") > 0.1  # the critic learned something (it starts at exactly 0)


def test_pipeline_sft_then_rm_then_ppo_with_the_reward_model(tmp_path):
    policy = sft.main(sft.Args(model="tiny", num_train=16, num_eval=4, max_steps=2, batch_size=8, save_every=0,
                               max_new_tokens=4, output_dir=str(tmp_path / "sft")))  # fmt: skip
    reward = rm.main(rm.Args(model=policy, num_train=8, num_eval=4, max_steps=2, save_every=0, output_dir=str(tmp_path / "rm")))
    out = ppo.main(tiny_args(tmp_path, model=policy, reward=reward, critic_init="reward", max_steps=2, eval_every=0))
    rows = read_metrics(out)
    assert "eval/rm_score" in rows[0] and "eval/rm_score" in rows[-1]
    assert all(math.isfinite(r["score"]) for r in rows if "score" in r)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(f"{out}/critic")  # the critic reloads
    before, after = common.load_model(policy), common.load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, llama3):
    path = tiny_reward_model(tmp_path / "rm")
    llama3.save_pretrained(path)
    with pytest.raises(ValueError, match="its tokenizer differs from the policy's"):
        ppo.main(tiny_args(tmp_path, reward=path, max_steps=1))


def test_nan_rewards_stop_the_run_naming_the_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "rule_reward", lambda completion, answer: float("nan"))
    with pytest.raises(FloatingPointError, match="the reward is nan for 4 answer.*e.g. prompt"):
        ppo.main(tiny_args(tmp_path, max_steps=1))
    assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing was trained or saved


# ───────────── processes: torchrun, kill and resume ─────────────


def cli(tmp_path):
    return ["--model", "tiny", "--num-train", "16", "--num-eval", "2", "--prompts-per-step", "8", "--max-new-tokens", "6",
            "--lr", "2e-3", "--critic-lr", "2e-3", "--reward", tiny_reward_model(tmp_path / "rm"), "--target-kl", "1.0"]  # fmt: skip


def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path):
    check_two_processes_match_one("ppo.py", cli(tmp_path) + ["--max-steps", "3", "--max-tokens", "200"], tmp_path, lr=2e-3)


def test_two_gloo_processes_sharding_the_policy_give_the_weights_of_one_process(tmp_path):
    """--fsdp: the ranks pack their answers into different numbers of micro-batches; stand-ins even them out."""
    args = cli(tmp_path) + ["--max-steps", "2", "--max-tokens", "200", "--fsdp", "--eval-every", "0"]
    check_two_processes_match_one("ppo.py", args, tmp_path, lr=2e-3)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = cli(tmp_path) + ["--max-steps", "6", "--save-every", "3", "--eval-every", "0"]
    check_resume_matches_uninterrupted("ppo.py", args, tmp_path, steps=6)
