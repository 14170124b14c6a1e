"""dpo.py: dpo_loss against the paper's formula (hand-worked, float64 brute force, gradcheck, extreme
log-ratios, the DPOP anchor, label smoothing), the packed chosen/rejected forward, learning and
likelihood displacement on the tiny model, online mode with a rule, a reward model and a judge,
2 gloo processes vs 1, kill and --resume, bad pairs.

    python -m pytest tests/test_dpo.py
"""

import json
import math
import os
import pytest
import torch
from safetensors.torch import load_file

import common
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, tiny_reward_model
import dpo



def formula(pi_w, pi_l, ref_w, ref_l, beta, lam=0.0, eps=0.0):
    """The DPO / DPOP / cDPO loss of one pair written out in float64 Python."""
    h = beta * ((pi_w - ref_w) - (pi_l - ref_l) - lam * max(0.0, ref_w - pi_w))  # arXiv:2402.13228 eq. 3
    log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
    return -(1 - eps) * log_sig(h) - eps * log_sig(-h)


def test_dpo_loss_matches_hand_computation():
    # logratio_w − logratio_l = (−1 + 2) − (−3 + 2) = 2;  β = 0.5  →  −log σ(1) = log(1 + e^−1)
    pi_w, pi_l, ref_w, ref_l = torch.tensor([[-1.0], [-3.0], [-2.0], [-2.0]])
    loss, r_w, r_l = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert (r_w.item(), r_l.item()) == pytest.approx((0.5, -0.5))


@pytest.mark.parametrize("beta,lam,eps", [(0.1, 0.0, 0.0), (0.5, 0.0, 0.1), (0.1, 5.0, 0.0), (1.0, 2.0, 0.2)])
def test_dpo_loss_matches_the_formula_at_many_points_including_extremes(beta, lam, eps):
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(64, 4, generator=g, dtype=torch.float64) * 30 - 40  # summed log-probs of long answers
    pts[:4] = torch.tensor([[-1e4, -1.0, -1.0, -1e4], [-1.0, -1e4, -1e4, -1.0], [0.0, 0.0, 0.0, 0.0], [-5e3, -5e3, -1.0, -1.0]])
    loss, _, _ = dpo.dpo_loss(*pts.unbind(1), beta, lam, eps)
    assert torch.isfinite(loss).all()
    want = torch.tensor([formula(*p.tolist(), beta, lam, eps) for p in pts], dtype=torch.float64)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-9)
    loss32, _, _ = dpo.dpo_loss(*pts.float().unbind(1), beta, lam, eps)
    assert torch.isfinite(loss32).all()


def test_dpo_loss_gradcheck_float64():
    pts = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        return dpo.dpo_loss(*x.unbind(1), 0.3, 2.0, 0.1)[0]

    pts.data[:, 0] = pts.data[:, 2] + torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])  # away from the max(0, ·) kink
    assert torch.autograd.gradcheck(f, (pts,))


def test_dpop_term_is_zero_while_chosen_stays_above_the_reference():
    pi_w, pi_l, ref_w, ref_l = torch.tensor([-10.0, -12.0]), torch.tensor([-20.0, -20.0]), torch.tensor([-11.0, -11.0]), torch.tensor([-19.0, -19.0])
    plain, _, _ = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, 0.1)
    anchored, _, _ = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, 0.1, dpop_lambda=50.0)
    assert anchored[0] == plain[0]  # pi_w > ref_w: no penalty
    assert anchored[1] > plain[1]  # pi_w < ref_w: penalty β · 50 · 1 inside the sigmoid
    assert anchored[1].item() == pytest.approx(formula(-12.0, -20.0, -11.0, -19.0, 0.1, 50.0))


def test_dpop_gradient_pushes_a_sinking_chosen_log_prob_up_harder():
    pi_w = torch.tensor([-12.0], requires_grad=True)
    for lam in (0.0, 50.0):
        pi_w.grad = None
        dpo.dpo_loss(pi_w, torch.tensor([-30.0]), torch.tensor([-11.0]), torch.tensor([-19.0]), 0.1, lam)[0].sum().backward()
        if lam == 0:
            plain = pi_w.grad.item()
    assert pi_w.grad.item() < plain < 0  # descending the loss raises log π(y_w|x), more with the anchor


def test_packed_chosen_rejected_forward_equals_separate_forwards(tiny, chatml):
    rows = common.builtin_preferences("train", 3)
    pairs, _ = dpo.tokenize_pairs(rows, chatml, 4096)
    (idx, batch), = dpo.pair_batches(pairs, 4096)
    with torch.no_grad():
        c, r = dpo.pair_logps(tiny, batch)
        for k, i in enumerate(idx):
            for got, key in ((c[k], "chosen"), (r[k], "rejected")):
                s = pairs[i][key]
                ids = torch.tensor([s["input_ids"]])
                lp = torch.log_softmax(tiny(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
                mask = torch.tensor(s["labels"][1:]) != -100
                assert got.item() == pytest.approx(lp[mask].sum().item(), abs=1e-4)


def test_pair_labels_cover_only_the_completion(chatml):
    rows = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier turn"},
                        {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}]  # fmt: skip
    pairs, _ = dpo.tokenize_pairs(rows, chatml, 4096)
    for key, want in (("chosen", "4<|im_end|>"), ("rejected", "5<|im_end|>")):
        s = pairs[0][key]
        assert chatml.decode([t for t, l in zip(s["input_ids"], s["labels"]) if l != -100]) == want


def test_bad_pairs_are_counted_skips_or_clear_errors(chatml, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a" * 300, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    pairs, skipped = dpo.tokenize_pairs(rows, chatml, 200)
    assert len(pairs) == 1 and skipped == {"identical": 1, "empty": 1, "too_long": 1}
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(common.DataError, match=r"p.jsonl:2: missing field 'rejected'"):
        dpo.main(dpo.Args(model="tiny", data=str(path), output_dir=str(tmp_path / "run")))
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    with pytest.raises(ValueError, match="no usable preference pairs"):
        dpo.main(dpo.Args(model="tiny", data=str(path), output_dir=str(tmp_path / "run")))


# ───────────── learning on the tiny model ─────────────


def write_style_pairs(path, n, seed):
    """A preference that generalises: answers starting "Sure" beat answers starting "No"."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            row = {"prompt": f"What is {a} plus {b}?", "chosen": f"Sure! It is {a + b}.", "rejected": f"No. It is {a + b}."}
            f.write(json.dumps(row) + "\n")
    return str(path)


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_dpo_raises_held_out_reward_accuracy(tmp_path):
    train, test = write_style_pairs(tmp_path / "train.jsonl", 64, 0), write_style_pairs(tmp_path / "test.jsonl", 32, 1)
    args = dpo.Args(model="tiny", data=train, eval_data=test, max_steps=12, batch_size=8, lr=2e-3, beta=0.1,
                    save_every=0, output_dir=str(tmp_path / "run"))  # fmt: skip
    out = dpo.main(args)
    evals = [r for r in metrics(out) if "eval/rewards/accuracies" in r]
    assert evals[0]["eval/rewards/accuracies"] == 0.0  # policy = reference: every margin is 0
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9 and evals[-1]["eval/rewards/margins"] > 0.5
    train_rows = [r for r in metrics(out) if "loss" in r]
    assert train_rows[-1]["loss"] < 0.5 < train_rows[0]["loss"]
    saved = load_file(os.path.join(out, "model.safetensors"))
    init = common.tiny_model(common.tiny_tokenizer()).state_dict()
    assert not torch.allclose(saved["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])


def test_plain_dpo_displaces_the_chosen_likelihood_and_dpop_holds_it_up(tmp_path):
    # Start from an SFT model that already puts high likelihood on the chosen answers, and train on
    # built-in pairs that differ in one number: the setting where DPO lowers both likelihoods (arXiv:2402.13228, §3).
    import sft

    start = sft.main(sft.Args(model="tiny", num_train=256, num_eval=4, max_steps=40, batch_size=16, lr=3e-3,
                              max_new_tokens=2, save_every=0, output_dir=str(tmp_path / "sft")))  # fmt: skip
    runs = {}
    for name, lam in (("dpo", 0.0), ("dpop", 50.0)):
        args = dpo.Args(model=start, num_train=32, num_eval=8, max_steps=15, batch_size=8, lr=1e-3, beta=0.1, rejected="data",
                        dpop_lambda=lam, max_new_tokens=2, save_every=0, output_dir=str(tmp_path / name))  # fmt: skip
        runs[name] = [r for r in metrics(dpo.main(args)) if "loss" in r]
    drift = {k: sum(r["logps/chosen_drift"] for r in v[-5:]) / 5 for k, v in runs.items()}
    assert drift["dpo"] < -20.0  # the chosen answers became much less likely than under the reference
    assert drift["dpop"] > -1.0  # the anchor keeps them at or above it
    margins = [r["rewards/margins"] for r in runs["dpop"][-5:]]
    assert sum(margins) / 5 > 0  # while the preference is still learned


def canned_generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, batch_size=32, **kwargs):
    """Stands in for sampling: for each built-in prompt, answers 0..3 off the right one, ending in EOS,
    except every fourth answer, which is cut off (no EOS)."""
    import re

    out = []
    for i, p in enumerate(prompts):
        a, b, c = map(int, re.findall(r"\d+", p)[:3])
        text = f"So {a} + {b} - {c}. The answer is {a + b - c + i % 4}."
        ids = tokenizer.encode(text, add_special_tokens=False) + ([] if i % 4 == 3 else [tokenizer.eos_token_id])
        out.append({"text": text, "prompt_ids": [], "completion_ids": ids, "ended": i % 4 != 3})
    return out


def test_online_dpo_with_the_rule_reward_judge_and_reward_model_pairs_and_trains(tmp_path, monkeypatch):
    rm_dir = tiny_reward_model(tmp_path / "rm")
    monkeypatch.setattr(common, "generate", canned_generate)
    base = dict(model="tiny", online=True, num_train=16, num_eval=4, max_steps=4, online_every=2, batch_size=4,
                num_samples=4, max_new_tokens=6, lr=1e-3, save_every=0)  # fmt: skip
    for name, extra in (("rule", {}), ("judge", {"judge": "tiny"}), ("rm", {"reward_model": rm_dir})):
        rows = metrics(dpo.main(dpo.Args(**base, **extra, output_dir=str(tmp_path / f"run-{name}"))))
        rounds = [r for r in rows if "online/pairs" in r]
        # a round samples batch_size × online_every = 8 prompts; each yields one pair and one cut-off answer
        assert len(rounds) == 2 and all(r["online/pairs"] == 8 and r["online/truncated"] == 8 for r in rounds)
        steps = [r for r in rows if "loss" in r]
        assert len(steps) == 4 and steps[-1]["logps/chosen_drift"] != 0
        if name == "rule":  # the right answer (offset 0) is always kept as chosen: reward 1 vs 0
            assert all(r["online/score"] == pytest.approx(0.25) for r in rounds)


def test_own_answers_replace_the_rejected_drop_the_right_ones_and_are_cached(tmp_path, monkeypatch, tiny, chatml):
    """SPIN's pairs: canned answers k = i % 4 off the right one, k = 3 cut off. k = 0 is right: dropped."""
    monkeypatch.setattr(common, "generate", canned_generate)
    rows, args = common.builtin_preferences("train", 8), dpo.Args(max_new_tokens=6)
    out, stats = dpo.own_answers(rows, tiny, chatml, "train", args, str(tmp_path), 0, 1)
    assert stats == {"own_right": 2, "own_cut_off": 2}
    canned = canned_generate(None, chatml, [r["prompt"] for r in rows], 6)
    assert [r["rejected"] for r in out] == [canned[i]["text"] for i in range(8) if i % 4]
    assert [r["chosen"] for r in out] == [rows[i]["chosen"] for i in range(8) if i % 4]

    def fail(*a, **k):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr(common, "generate", fail)  # same weights, same prompts: read back, not generated
    assert dpo.own_answers(rows, tiny, chatml, "train", args, str(tmp_path), 0, 1) == (out, stats)
    with torch.no_grad():
        tiny.lm_head.weight.add_(1e-3)  # other weights: generated again
    with pytest.raises(AssertionError, match="reused"):
        dpo.own_answers(rows, tiny, chatml, "train", args, str(tmp_path), 0, 1)


def test_the_builtin_default_trains_against_the_models_own_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "generate", canned_generate)  # the tiny model writes only line breaks (empty answers)
    out = dpo.main(dpo.Args(model="tiny", num_train=8, num_eval=4, max_steps=2, batch_size=4, max_new_tokens=6, save_every=0,
                            output_dir=str(tmp_path / "run")))  # fmt: skip
    own = [json.loads(line) for line in open(os.path.join(out, "own_answers-train.jsonl"))]
    prompts = [p["prompt"] for p in common.builtin_prompts("train", 8)]
    assert [o["text"] for o in own] == [g["text"] for g in canned_generate(None, common.tiny_tokenizer(), prompts, 6)]
    assert "6 training pairs" in capsys.readouterr().out  # the two right own answers are not rejected
    rows = metrics(out)
    assert "eval/format" in rows[0] and [r for r in rows if "loss" in r][-1]["rewards/margins"] != 0


def stated_answer(text: str) -> int:
    return int(text.rsplit("The answer is ", 1)[1].split(".")[0])


@pytest.mark.parametrize("kind", ["rule", "judge", "reward model"])
def test_online_pairs_take_the_scorers_favourite_as_chosen_and_its_least_favourite_as_rejected(monkeypatch, chatml, kind):
    """canned answers state a + b − c + k, k = 0..3 (k = 3 cut off, never paired). The rule scores k = 0 as 1 and
    the rest 0 (the first of the tied, k = 1, is rejected); the judge and the reward model are made to prefer
    the largest stated number, so they must pick k = 2 over k = 0."""
    monkeypatch.setattr(common, "generate", canned_generate)
    monkeypatch.setattr(dpo, "judge_preference", lambda j, t, principle, prompt, a, b, d: float(stated_answer(a) > stated_answer(b)))
    monkeypatch.setattr(common, "reward_model_scores", lambda m, t, p, texts, d, n: torch.tensor([float(stated_answer(x)) for x in texts]))
    args = dpo.Args(num_samples=4, judge="j" if kind == "judge" else "", reward_model="r" if kind == "reward model" else "")
    prompts = common.builtin_prompts("train", 3)
    pairs, _ = dpo.online_pairs(None, chatml, prompts, args, None if kind == "rule" else (None, chatml), torch.device("cpu"))
    assert len(pairs) == 3
    for pair, p in zip(pairs, prompts):
        chosen, rejected = (stated_answer(chatml.decode(pair[k]["input_ids"])) - p["answer"] for k in ("chosen", "rejected"))
        assert (chosen, rejected) == ((0, 1) if kind == "rule" else (2, 0))


def test_judge_preference_is_symmetric_under_swapping(tiny, chatml):
    p_ab = dpo.judge_preference(tiny, chatml, "Be correct.", "2+2?", "4", "5", torch.device("cpu"))
    p_ba = dpo.judge_preference(tiny, chatml, "Be correct.", "2+2?", "5", "4", torch.device("cpu"))
    assert 0 < p_ab < 1 and p_ab + p_ba == pytest.approx(1.0, abs=1e-6)


# ───────────── processes: torchrun, kill and resume ─────────────

CLI = ["--model", "tiny", "--num-train", "48", "--num-eval", "4", "--batch-size", "8", "--lr", "2e-3",
       "--max-new-tokens", "2", "--warmup-steps", "1"]  # fmt: skip


def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path, tuned_tiny):
    # the rejected answers are the model's own (each rank generates its share): a model that writes some
    cli = CLI[2:] + ["--model", tuned_tiny, "--max-new-tokens", "8"]
    check_two_processes_match_one("dpo.py", cli + ["--max-steps", "3", "--max-tokens", "800"], tmp_path, lr=2e-3)


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, tuned_tiny):
    cli = CLI[2:] + ["--model", tuned_tiny, "--max-new-tokens", "8"]
    check_resume_matches_uninterrupted("dpo.py", cli + ["--max-steps", "12", "--save-every", "3"], tmp_path, steps=12)
