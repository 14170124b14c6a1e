"""variants.py: IPO, KTO, ORPO and SimPO against their papers' formulas written out in float64 Python
(hand-worked points, extremes, gradcheck), KTO's baseline (no gradient, never an example with itself,
branch signs), ORPO's stability as p → 0 and p → 1, learning on the tiny model for each loss, no
reference pass for ORPO / SimPO, 2 gloo processes vs 1, kill and --resume, bad input.

    python -m pytest tests/test_variants.py
"""

import json
import math

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, synthetic_preferences
from helpers import read_metrics as metrics

import common
import variants


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def points(n=64, seed=0, scale=30.0, shift=-40.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * scale + shift


# ───────────── IPO ─────────────


def test_ipo_loss_matches_hand_computation_and_the_formula_at_extremes():
    # h = (−1 + 2) − (−3 + 2) = 2, τ = 0.25 → target 2 → loss 0; τ = 0.5 → (2 − 1)² = 1
    w, l, rw, rl = torch.tensor([[-1.0], [-3.0], [-2.0], [-2.0]])
    assert variants.ipo_loss(w, l, rw, rl, tau=0.25)[0].item() == 0.0
    assert variants.ipo_loss(w, l, rw, rl, tau=0.5)[0].item() == pytest.approx(1.0)
    pts = points() * 10  # log-probs down to about −1000
    loss, _ = variants.ipo_loss(*pts.unbind(1), tau=0.1)
    want = [((a - c) - (b - d) - 5.0) ** 2 for a, b, c, d in pts.tolist()]
    assert torch.isfinite(loss).all() and loss.tolist() == pytest.approx(want, rel=1e-12)
    args = tuple(x.clone().requires_grad_() for x in points(8).unbind(1))
    assert torch.autograd.gradcheck(lambda *a: variants.ipo_loss(*a, tau=0.1)[0], args)


# ───────────── KTO ─────────────


def kto_formula(lr, desirable, kl, beta, ld, lu):
    z = max(0.0, kl)
    return ld * (1 - sigmoid(beta * (lr - z))) if desirable else lu * (1 - sigmoid(beta * (z - lr)))


@pytest.mark.parametrize("kl", [0.0, 3.0, -2.0])  # a negative estimate is clamped to 0
def test_kto_loss_matches_the_formula_with_weights_and_extremes(kl):
    g = torch.Generator().manual_seed(1)
    lr = torch.randn(64, generator=g, dtype=torch.float64) * 200  # extreme log-ratios
    desirable = torch.rand(64, generator=g) < 0.5
    loss, reward = variants.kto_loss(lr, desirable, torch.tensor(kl, dtype=torch.float64), 0.1, 1.5, 0.7)
    want = [kto_formula(a, d, kl, 0.1, 1.5, 0.7) for a, d in zip(lr.tolist(), desirable.tolist())]
    assert torch.isfinite(loss).all() and loss.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert reward.tolist() == pytest.approx((0.1 * lr).tolist())


def test_kto_baseline_carries_no_gradient_and_the_branches_have_opposite_signs():
    lr = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    kl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss, _ = variants.kto_loss(lr, torch.tensor([True, False]), kl, 0.5, 1.0, 1.0)
    loss.sum().backward()
    assert kl.grad is None or kl.grad.item() == 0.0
    # raising log π(y|x) helps a desirable example and hurts an undesirable one
    assert lr.grad[0] < 0 < lr.grad[1]
    args = (torch.randn(6, dtype=torch.float64, requires_grad=True),)
    d = torch.tensor([True, False, True, False, False, True])
    assert torch.autograd.gradcheck(
        lambda x: variants.kto_loss(x, d, torch.tensor(0.3, dtype=torch.float64), 0.1, 1.0, 1.3)[0], args
    )


@pytest.mark.parametrize("n", [2, 3, 7, 8])
def test_kto_mismatched_partners_never_pair_an_example_with_itself(n):
    partners = variants.mismatched_partners(n, seed=0)
    assert all(p != i for i, p in enumerate(partners)) and sorted(partners) == list(range(n))
    with pytest.raises(ValueError, match="at least 2"):
        variants.mismatched_partners(1, seed=0)


def test_kto_examples_score_their_prompt_with_another_examples_answer(chatml):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(5)]
    out, _ = variants.tokenize_unpaired(rows, chatml, 512, seed=0)
    partners = variants.mismatched_partners(5, seed=0)
    for i, e in enumerate(out):
        text = chatml.decode(e["mismatch"]["input_ids"])
        assert f"q{i}" in text and f"a{partners[i]}" in text and f"a{i}<" not in text
        assert e["desirable"] == (i % 2 == 0)


# ───────────── ORPO ─────────────


def orpo_formula(a, b):
    log_odds = lambda x: x - math.log(-math.expm1(x)) if x > -0.69 else x - math.log1p(-math.exp(x))
    return -log_sigmoid(log_odds(a) - log_odds(b))


def test_orpo_loss_matches_the_formula_and_is_stable_as_p_goes_to_0_and_1():
    # hand-worked: p_w = 1/2, p_l = 1/4 → odds 1 and 1/3 → −log σ(log 3) = log(1 + 1/3)
    loss, ratio = variants.orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert loss.item() == pytest.approx(math.log(4 / 3), rel=1e-6) and ratio.item() == pytest.approx(math.log(3), rel=1e-6)
    avg = -torch.rand(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    loss, _ = variants.orpo_loss(avg[:, 0], avg[:, 1])
    assert loss.tolist() == pytest.approx([orpo_formula(a, b) for a, b in avg.tolist()], rel=1e-10)
    # p → 1 (mean log-prob → 0⁻, and exactly 0) and p → 0 (very negative), in float32 as in training
    extreme = torch.tensor([-1e-9, 0.0, -1e-30, -50.0, -1e4], dtype=torch.float32)
    for a in extreme:
        for b in extreme:
            loss, _ = variants.orpo_loss(a.view(1).requires_grad_(), b.view(1))
            assert torch.isfinite(loss).all()
    x = torch.tensor([-1e-10, -1e-5, -0.5, -3.0, -100.0], dtype=torch.float64)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert variants.log1mexp(x).tolist() == pytest.approx(want, rel=1e-12)  # where log(1 − eˣ) loses every digit
    args = tuple(x.clone().requires_grad_() for x in (avg[:8, 0], avg[:8, 1]))
    assert torch.autograd.gradcheck(lambda a, b: variants.orpo_loss(a, b)[0], args)


# ───────────── SimPO ─────────────


def test_simpo_loss_matches_hand_computation_and_the_formula():
    # β = 2, avg_w = −1, avg_l = −2, γ = 1 → −log σ(−2 + 4 − 1) = log(1 + e^−1)
    loss, r_w, r_l = variants.simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6) and (r_w.item(), r_l.item()) == (-2.0, -4.0)
    avg = points(shift=0.0, scale=50.0)[:, :2]  # margins of several hundred
    loss, _, _ = variants.simpo_loss(avg[:, 0], avg[:, 1], 2.5, 1.4)
    want = [-log_sigmoid(2.5 * a - 2.5 * b - 1.4) for a, b in avg.tolist()]
    assert torch.isfinite(loss).all() and loss.tolist() == pytest.approx(want, rel=1e-10)
    args = tuple(x.clone().requires_grad_() for x in (avg[:8, 0] / 50, avg[:8, 1] / 50))
    assert torch.autograd.gradcheck(lambda a, b: variants.simpo_loss(a, b, 2.0, 1.0)[0], args)


# ───────────── training on the tiny model ─────────────


@pytest.mark.parametrize("loss,lr", [("ipo", 1e-3), ("kto", 3e-3), ("orpo", 3e-3), ("simpo", 3e-3)])
def test_each_variant_raises_held_out_preference_accuracy(tmp_path, monkeypatch, loss, lr):
    train, test = synthetic_preferences(tmp_path / "a.jsonl", 48, 0), synthetic_preferences(tmp_path / "b.jsonl", 32, 1)
    scored = []  # which data the starting model scores: the held-out pairs, and the training data only with a reference
    real = variants.all_logps
    monkeypatch.setattr(variants, "all_logps", lambda m, units, keys, *a: scored.append(keys) or real(m, units, keys, *a))
    out = variants.main(variants.Args(model="tiny", loss=loss, data=train, eval_data=test, max_steps=20, batch_size=8, lr=lr,
                                      save_every=0, output_dir=str(tmp_path / loss)))  # fmt: skip
    rows = metrics(out)
    assert rows[-1]["eval/rewards/accuracies"] >= 0.9 > rows[0]["eval/rewards/accuracies"]
    steps = [r for r in rows if "loss" in r]
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5])
    want = {"ipo": ("chosen", "rejected"), "kto": ("completion", "mismatch")}.get(loss)
    pairs = ("chosen", "rejected")
    assert scored == [pairs] + ([want] if want else []) + [pairs] * 2  # held-out start point, π_ref (ipo/kto only), 2 evals
    if loss == "kto":  # paired data split into unpaired: desirable answers end above undesirable ones
        assert steps[-1]["rewards/desirable"] > steps[-1]["rewards/undesirable"] and "kl" in steps[-1]


def test_kto_trains_with_a_batch_of_one_and_an_odd_batch(tmp_path):
    for b in (1, 3):
        out = variants.main(variants.Args(model="tiny", loss="kto", num_train=8, num_eval=2, max_steps=2, batch_size=b,
                                          max_new_tokens=2, save_every=0, output_dir=str(tmp_path / str(b))))  # fmt: skip
        assert all(math.isfinite(r["loss"]) for r in metrics(out) if "loss" in r)


# ───────────── processes: torchrun, kill and resume ─────────────

CLI = ["--model", "tiny", "--num-train", "48", "--num-eval", "4", "--batch-size", "8", "--lr", "2e-3",
       "--max-new-tokens", "2", "--warmup-steps", "1"]  # fmt: skip


@pytest.mark.parametrize("loss", ["kto", "orpo"])
def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path, loss):
    args = CLI + ["--loss", loss, "--max-steps", "3", "--max-tokens", "600"]
    check_two_processes_match_one("variants.py", args, tmp_path, lr=2e-3)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = CLI + ["--loss", "kto", "--max-steps", "6", "--save-every", "3"]
    check_resume_matches_uninterrupted("variants.py", args, tmp_path, steps=6)


# ───────────── bad input ─────────────


def test_kto_with_one_class_is_a_clear_error_and_imbalance_a_warning(tmp_path, capsys):
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "label": True}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="4 desirable and 0 undesirable"):
        variants.main(variants.Args(model="tiny", loss="kto", data=str(path), max_steps=1, output_dir=str(tmp_path / "o")))
    examples = [{"desirable": i < 9} for i in range(10)]
    variants.check_kto_balance(examples, 1.0, 1.0, rank=0)
    assert "outside the paper's [1, 4/3]" in capsys.readouterr().out
    path.write_text('{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(common.DataError, match="u.jsonl:1: missing field 'label'"):
        variants.read_unpaired(str(path))


def test_bad_pairs_are_counted_skips_and_no_usable_pair_is_a_clear_error(chatml, tmp_path):
    rows = [{"prompt": "p", "chosen": "s", "rejected": "s"}, {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": "p", "chosen": "a" * 600, "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]  # fmt: skip
    pairs, skipped = variants.tokenize_pairs(rows, chatml, 300)
    assert skipped == {"identical": 1, "empty": 1, "too_long": 1} and len(pairs) == 1
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "s", "rejected": "s"}\n')
    with pytest.raises(ValueError, match="no usable training examples"):
        variants.main(variants.Args(model="tiny", loss="simpo", data=str(path), max_steps=1, output_dir=str(tmp_path / "o")))
