"""rm.py: the Bradley-Terry loss against its formula (hand-worked, float64, margin, centering, extremes,
gradcheck), the last-token read-out for packed and padded rows, PRM labels at step ends only, the
min / product aggregation and best-of-N selection on hand-made scores, Monte Carlo labels, learning on
the tiny model (ORM and PRM), the saved model loading in plain transformers, best-of-N end to end,
2 gloo processes vs 1, kill and --resume, bad input.

    python -m pytest tests/test_rm.py
"""

import json
import math
import os
import random

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, synthetic_preferences
from helpers import read_metrics as metrics

import common
import rm

CPU = torch.device("cpu")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ───────────── losses and aggregation ─────────────


def test_bradley_terry_loss_matches_hand_computation():
    # r_w − r_l = 2 − 1 = 1 → −log σ(1) = log(1 + e^−1); with m = 1 → −log σ(0) = log 2
    loss = rm.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    loss = rm.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    # centering: η (r_w + r_l)² = 0.01 · 9 on top
    loss = rm.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.01)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 0.09, abs=1e-6)


def test_bradley_terry_loss_matches_the_formula_at_extremes_and_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 3, generator=g, dtype=torch.float64) * 40  # differences up to ±200: log σ must not overflow
    r_w, r_l, m = r.unbind(1)
    want = sum(-log_sigmoid(a - b - c) + 0.05 * (a + b) ** 2 for a, b, c in r.tolist()) / 64
    got = rm.bradley_terry_loss(r_w, r_l, m, center_coef=0.05)
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-12)
    huge = rm.bradley_terry_loss(torch.tensor([1e4]), torch.tensor([-1e4]))
    assert huge.item() == 0.0 and torch.isfinite(rm.bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])))
    args = tuple(x.clone().requires_grad_() for x in (r_w[:8] / 10, r_l[:8] / 10, m[:8] / 10))
    assert torch.autograd.gradcheck(lambda a, b, c: rm.bradley_terry_loss(a, b, c, center_coef=0.05), args)


def test_prm_loss_is_binary_cross_entropy_with_soft_labels():
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.25])
    want = [-(y * log_sigmoid(z) + (1 - y) * log_sigmoid(-z)) for z, y in zip(logits.tolist(), labels.tolist())]
    assert rm.prm_loss(logits, labels).tolist() == pytest.approx(want, abs=1e-6)


def test_min_and_product_aggregation_on_hand_made_step_scores():
    steps = torch.tensor([2.0, -1.0, 3.0])
    assert rm.aggregate_steps(steps, "min").item() == -1.0
    product = 1 / (1 + math.exp(-2)) * 1 / (1 + math.exp(1)) * 1 / (1 + math.exp(-3))
    assert math.exp(rm.aggregate_steps(steps, "product").item()) == pytest.approx(product, rel=1e-6)
    assert rm.aggregate_steps(torch.empty(0), "min").item() == float("-inf")
    # one bad step sinks a solution under min, many mildly unsure steps sink it under product
    a, b = torch.tensor([4.0, 4.0, -0.5]), torch.tensor([0.1] * 8)
    assert rm.aggregate_steps(a, "min") < rm.aggregate_steps(b, "min")
    assert rm.aggregate_steps(a, "product") > rm.aggregate_steps(b, "product")


def test_best_of_n_keeps_the_top_scored_answer_of_each_disjoint_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 2.5]])
    correct = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]])
    # N = 2, groups {0,1}, {2,3}: picks (1, 2) -> 1, 0 and (0, 3) -> 0, 0; N = 4: picks 1 -> 1 and 0 -> 0
    assert rm.best_of_n_accuracy(scores, correct, 2) == pytest.approx(0.25)
    assert rm.best_of_n_accuracy(scores, correct, 4) == pytest.approx(0.5)
    assert rm.best_of_n_accuracy(correct.float(), correct, 2) == pytest.approx(0.75)  # pass@2: an oracle
    assert rm.best_of_n_accuracy(scores, correct, 1) == pytest.approx(3 / 8)  # N = 1: every sample counts


def test_weighted_vote_keeps_the_answer_with_the_largest_summed_weight():
    x = rm.NO_ANSWER
    answers = torch.tensor([[5, 7, 7, x], [x, x, 3, 3]])
    correct = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]])
    ones = torch.ones(2, 4)
    # majority vote, N = 4: 7 (two votes) over 5; 3 over nothing. N = 2: {5, 7} tie -> 5, the first; {7, x} -> 7;
    # {x, x} -> no answer anywhere, the first sample, wrong; {3, 3} -> 3
    assert rm.weighted_vote_pick(ones, answers, 4).flatten().tolist() == [1, 2]
    assert rm.weighted_vote_accuracy(ones, answers, correct, 4) == pytest.approx(0.5)
    assert rm.weighted_vote_pick(ones, answers, 2).flatten().tolist() == [0, 0, 0, 0]
    assert rm.weighted_vote_accuracy(ones, answers, correct, 2) == pytest.approx(0.5)
    # weights: 5 (0.7) beats 7 (0.2 + 0.4); a heavy sample with no answer is still never kept
    w = torch.tensor([[0.7, 0.2, 0.4, 9.0], [9.0, 9.0, 0.0, 0.0]])
    assert rm.weighted_vote_pick(w, answers, 4).flatten().tolist() == [0, 2]
    assert rm.weighted_vote_accuracy(w, answers, correct, 4) == pytest.approx(1.0)
    # N = 1: every sample is its own group, the vote keeps it: the mean correctness
    assert rm.weighted_vote_accuracy(w, answers, correct, 1) == pytest.approx(3 / 8)


def test_stated_answers_become_small_ids_equal_for_equal_answers():
    texts = ["The answer is 7.", "so The answer is -3", "no answer", "The answer is 7", "The answer is 123456789012345678901234567890."]
    assert rm.stated_answer_ids(texts) == [0, 1, rm.NO_ANSWER, 0, 2]  # a number past int64 still gets an id
    assert torch.tensor(rm.stated_answer_ids(texts)).dtype == torch.long


def test_vote_weights_are_ones_bradley_terry_strengths_and_step_probabilities():
    orm, prm = torch.tensor([[0.0, math.log(3.0), float("-inf")]]), torch.tensor([[0.0, 2.0, -1.0]])
    w = rm.vote_weights({"orm": orm, "orm_untrained": orm, "prm_min": prm, "prm_product": prm}, orm.shape)
    assert set(w) == {"vote", "orm_vote", "orm_untrained_vote", "prm_vote"} and w["vote"].tolist() == [[1.0] * 3]
    assert w["orm_vote"][0].tolist() == pytest.approx([1 / 4, 3 / 4, 0.0])  # exp(r), scaled to sum 1
    assert w["prm_vote"][0].tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.e)])


def test_weighted_vote_matches_counting_by_hand_on_random_groups():
    g = torch.Generator().manual_seed(0)
    answers = torch.randint(0, 4, (50, 12), generator=g)
    answers[torch.rand(50, 12, generator=g) < 0.2] = rm.NO_ANSWER
    weights = torch.rand(50, 12, generator=g)
    for n in (3, 4, 12):
        picks = rm.weighted_vote_pick(weights, answers, n)
        for p in range(50):
            for k in range(12 // n):
                group = list(range(k * n, (k + 1) * n))
                sums = {}
                for i in group:
                    if answers[p, i] != rm.NO_ANSWER:
                        sums[int(answers[p, i])] = sums.get(int(answers[p, i]), 0.0) + float(weights[p, i])
                if sums:  # the largest sum; on a tie the answer stated first
                    best = max(sums.values())
                    first = next(i for i in group if int(answers[p, i]) in sums and sums[int(answers[p, i])] == best)
                    assert int(answers[p, k * n + int(picks[p, k])]) == int(answers[p, first])


def test_split_steps_cuts_at_sentence_ends_and_line_breaks():
    assert rm.split_steps("Ava has 3.5 pens. 3 + 4 = 7.\nThe answer is 7.") == [
        "Ava has 3.5 pens.",
        "3 + 4 = 7.",
        "The answer is 7.",
    ]
    assert rm.split_steps("  ") == [] and rm.split_steps("no period") == ["no period"]


# ───────────── read-out positions ─────────────


def test_last_token_reward_is_right_for_packed_rows_and_left_and_right_padding(chatml):
    model = rm.reward_model("tiny", chatml, "orm", seed=0).eval()
    docs = [common.tokenize_conversation(chatml, common.as_messages(f"q{i}" * (i + 1), "a" * (3 * i + 1))) for i in range(3)]
    alone = torch.stack([common.last_token_hidden(model, common.collate_packed([d]))[0] for d in docs])
    packed = common.last_token_hidden(model, common.collate_packed(docs))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for side in ("left", "right"):
        padded = common.last_token_hidden(model, common.collate_padded(docs, chatml.pad_token_id, side))
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    # transformers' own forward of the saved class reads the same position (the last non-pad token)
    with torch.no_grad():
        for d, h in zip(docs, alone):
            assert model(input_ids=torch.tensor([d["input_ids"]])).logits.item() == pytest.approx(
                model.score(h).item(), abs=1e-5
            )


def test_prm_labels_land_only_on_the_separator_after_each_step(chatml, llama3):
    steps, labels = ["Ava has 3 pens.", "3 + 4 = 8.", "The answer is 8."], [True, False, False]
    for tok in (chatml, llama3):
        s = rm.tokenize_steps(tok, "How many?", steps, labels, "\n")
        at = [i for i, y in enumerate(s["step_labels"]) if y >= 0]
        assert [s["step_labels"][i] for i in at] == [1.0, 0.0, 0.0]
        assert [tok.decode(s["input_ids"][i]) for i in at] == ["\n"] * 3
        # the text just before each labelled token is that step
        for i, step in zip(at, steps):
            assert tok.decode(s["input_ids"][:i]).endswith(step)
    s = rm.tokenize_steps(chatml, "How many?", steps, labels, " ки")  # a Math-Shepherd style tag
    assert [chatml.decode(s["input_ids"][i]) for i, y in enumerate(s["step_labels"]) if y >= 0] == [" "] * 3


def test_step_scores_of_a_packed_row_equal_those_of_each_solution_alone(chatml):
    model = rm.reward_model("tiny", chatml, "prm", seed=0).eval()
    rows = common.builtin_prm("train", 3)
    samples = rm.prm_samples(rows, chatml, "\n", 4096)[0]
    with torch.no_grad():
        alone = torch.cat([rm.step_logits(model, common.collate_packed([s], extra=("step_labels",)))[0] for s in samples])
        packed, labels = rm.step_logits(model, common.collate_packed(samples, extra=("step_labels",)))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [float(x) for r in rows for x in r["labels"]]


def test_monte_carlo_labels_are_the_fraction_of_rollouts_that_reach_the_answer(chatml, monkeypatch):
    row = {"prompt": "q", "completions": ["2 + 2 = 4.", "4 - 1 = 3."], "labels": [True, True], "answer": 3}
    seen = []

    def canned(model, tok, prompts, max_new_tokens, temperature=0.0, batch_size=32, prefill=None, **kwargs):
        seen.extend(prefill)
        # after step 1: one of two rollouts finishes right; after step 2: both do
        texts = {
            "2 + 2 = 4. ": ["4 - 1 = 3. The answer is 3.", "The answer is 5."],
            "2 + 2 = 4. 4 - 1 = 3. ": ["The answer is 3."] * 2,
        }
        return [{"text": t} for p in dict.fromkeys(prefill) for t in texts[p]]

    monkeypatch.setattr(common, "generate", canned)
    out = rm.mc_step_labels(None, chatml, [row], k=2, max_new_tokens=8, temperature=1.0)
    assert out[0]["labels"] == [0.5, 1.0] and out[0]["completions"] == row["completions"]
    assert seen == ["2 + 2 = 4. "] * 2 + ["2 + 2 = 4. 4 - 1 = 3. "] * 2


def test_policy_pairs_prefer_every_right_answer_to_every_wrong_one_of_its_prompt_and_are_kept(tmp_path, monkeypatch):
    rows = [{"prompt": "p0", "answer": 3}, {"prompt": "p1", "answer": 5}, {"prompt": "p2", "answer": 7}]
    said = {"p0": [3, 4, 3, 9], "p1": [5, 5, 5, 5], "p2": [1, 2, 1, 0]}  # p0: 2 right, 2 wrong; p1 all right; p2 all wrong
    seen = []

    def canned(model, tok, prompts, max_new_tokens, temperature=0.0, **kwargs):
        seen.append((list(prompts), temperature))
        count = {}
        out = []
        for p in prompts:
            out.append({"text": f"The answer is {said[p][count.get(p, 0)]}."})
            count[p] = count.get(p, 0) + 1
        return out

    monkeypatch.setattr(common, "generate", canned)
    args = rm.Args(model="tiny", policy_samples=4, temperature=0.7)
    pairs = rm.policy_pairs(rows, args, 0, 1, CPU, str(tmp_path))
    assert seen == [(["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4, 0.7)]
    got = sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs)
    assert got == sorted(("p0", "The answer is 3.", f"The answer is {w}.") for _ in range(2) for w in (4, 9))
    # kept: the same policy and prompts sample nothing again; other arguments sample anew
    assert rm.policy_pairs(rows, args, 0, 1, CPU, str(tmp_path)) == pairs and len(seen) == 1
    rm.policy_pairs(rows, rm.Args(model="tiny", policy_samples=4, temperature=1.0), 0, 1, CPU, str(tmp_path))
    assert len(seen) == 2


def test_an_orm_learns_from_the_policys_own_right_and_wrong_answers(tmp_path, monkeypatch):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(4)) for _ in range(48)]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"say {w}", "answer": i}) + "\n" for i, w in enumerate(words))

    def canned(model, tok, prompts, max_new_tokens, temperature=0.0, **kwargs):  # right answers agree, wrong ones refuse
        answer = {f"say {w}": i for i, w in enumerate(words)}
        return [{"text": f"yes, {p[4:]}. The answer is {answer[p]}." if j % 2 else f"no. {p[4:]}. The answer is {answer[p] + 1}."}
                for j, p in enumerate(prompts)]  # fmt: skip

    monkeypatch.setattr(common, "generate", canned)
    test = synthetic_preferences(tmp_path / "test.jsonl", 32, 1)
    out = rm.main(rm.Args(model="tiny", orm_pairs="policy", policy_samples=2, data=str(tmp_path / "prompts.jsonl"), eval_data=test,
                          max_steps=30, batch_size=16, lr=3e-3, eval_every=0, save_every=0, output_dir=str(tmp_path / "orm")))  # fmt: skip
    rows = metrics(out)
    assert rows[-1]["eval/accuracy"] >= 0.9 and rows[-1]["eval/accuracy"] > rows[0]["eval/accuracy"]
    with open(os.path.join(out, "policy_samples.jsonl")) as f:
        assert len(f.readlines()) == 48


def test_policy_pairs_need_an_orm_answers_in_the_prompt_file_and_two_samples(tmp_path):
    with pytest.raises(common.UserError, match="--orm-pairs policy"):
        rm.main(rm.Args(model="tiny", kind="prm", orm_pairs="policy", output_dir=str(tmp_path / "a")))
    with pytest.raises(common.UserError, match="--policy-samples"):
        rm.main(rm.Args(model="tiny", orm_pairs="policy", policy_samples=1, output_dir=str(tmp_path / "b")))
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "p", "answer": 1}\n{"prompt": "q"}\n')
    with pytest.raises(common.DataError, match="prompts.jsonl:2.*answer"):
        rm.main(rm.Args(model="tiny", orm_pairs="policy", data=str(path), output_dir=str(tmp_path / "c")))


# ───────────── training on the tiny model ─────────────


def test_orm_learns_a_synthetic_preference_and_saves_a_transformers_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, test = synthetic_preferences(tmp_path / "train.jsonl", 64, 0), synthetic_preferences(tmp_path / "test.jsonl", 32, 1)
    out = rm.main(rm.Args(model="tiny", data=train, eval_data=test, max_steps=30, batch_size=16, lr=3e-3, eval_every=0,
                          save_every=0, output_dir=str(tmp_path / "orm")))  # fmt: skip
    rows = metrics(out)
    before, after = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert after >= 0.9 and after > before
    assert rows[-1]["eval/margin"] > 1.0
    # plain transformers loads it, and scores a held-out pair the same way
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = common.load_tokenizer(out)
    doc = lambda a: torch.tensor([common.tokenize_conversation(tok, common.as_messages("say abcd", a))["input_ids"]])
    with torch.no_grad():
        assert loaded(input_ids=doc("yes, abcd")).logits.item() > loaded(input_ids=doc("no. abcd")).logits.item()
    start = rm.reward_model("tiny", tok, "orm", seed=0).state_dict()
    assert not torch.allclose(loaded.model.embed_tokens.weight, start["model.embed_tokens.weight"])


def test_likelihood_reward_is_beta_times_the_answers_mean_log_prob_in_packed_and_shared_rows(chatml):
    model = rm.reward_model("tiny", chatml, "orm", seed=0, beta=2.5).eval()
    pairs = [("q one", "yes, abcd", "no. ab"), ("what is q two?", "a", "The answer is 5.")]
    docs = [common.tokenize_conversation(chatml, common.as_messages(p, a), 1) for p, *ab in pairs for a in ab]

    def by_hand(d):  # a plain forward of the document alone: β · mean over its answer tokens of log softmax
        ids = torch.tensor([d["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        answer = torch.tensor(d["labels"][1:]) != common.IGNORE
        return 2.5 * logp[answer].mean().item()

    want = [by_hand(d) for d in docs]
    with torch.no_grad():
        packed = common.reward_scores(model, common.collate_packed(docs))
        shared = [rm.pair_rewards(model, b) for _, b in rm.micro_batches([{"chosen": docs[i], "rejected": docs[i + 1]}
                                                                           for i in (0, 2)], "orm", 4096)]  # fmt: skip
    assert packed.tolist() == pytest.approx(want, abs=1e-4)
    assert [x for w, l in shared for pair in zip(w.tolist(), l.tolist()) for x in pair] == pytest.approx(want, abs=1e-4)


def test_likelihood_orm_learns_saves_a_marked_causal_lm_and_ranks_answers_as_trained(tmp_path):
    train, test = synthetic_preferences(tmp_path / "train.jsonl", 64, 0), synthetic_preferences(tmp_path / "test.jsonl", 32, 1)
    out = rm.main(rm.Args(model="tiny", score="likelihood", data=train, eval_data=test, max_steps=30, batch_size=16, lr=3e-3,
                          eval_every=0, save_every=0, output_dir=str(tmp_path / "orm")))  # fmt: skip
    rows = metrics(out)
    assert rows[-1]["eval/accuracy"] >= 0.9 and rows[-1]["eval/accuracy"] > rows[0]["eval/accuracy"]
    loaded = common.load_reward_model(out)  # the causal LM, its config saying how it scores
    assert (loaded.config.reward_score, loaded.config.reward_beta) == ("likelihood", 2.0)
    tok = common.load_tokenizer(out)
    scores = common.reward_model_scores(loaded, tok, ["say abcd"] * 2, ["yes, abcd", "no. abcd"], CPU)
    assert scores[0] > scores[1]
    assert rm.score_responses(loaded, tok, "orm", ["say abcd"], ["yes, abcd"], "\n", 4096, CPU)[0].item() == pytest.approx(
        scores[0].item(), abs=1e-5)  # fmt: skip


def test_likelihood_step_scores_are_the_lowest_answer_token_log_prob_so_far_each_solution_alone(chatml):
    model = rm.reward_model("tiny", chatml, "prm", seed=0, beta=3.0, min_prob=0.2).eval()
    rows = [("q one", ["a b.", "c d e.", "The answer is 5."]), ("what is q two?", ["x.", "y z."])]
    samples = [rm.tokenize_steps(chatml, p, steps, [1.0] * len(steps), "\n") for p, steps in rows]

    def by_hand(s):  # one solution alone, plain forward: the running minimum over answer tokens that are not separators
        ids = torch.tensor([s["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        out, lowest = [], 0.0
        for t in range(1, len(s["input_ids"])):
            if s["labels"][t] != common.IGNORE and s["step_labels"][t] < 0:
                lowest = min(lowest, logp[t - 1].item())
            if s["step_labels"][t] >= 0:
                out.append(3.0 * (lowest - math.log(0.2)))
        return out

    with torch.no_grad():
        got, _ = rm.step_logits(model, common.collate_packed(samples, extra=("step_labels",)))
    want = [x for s in samples for x in by_hand(s)]
    assert len(want) == 5 and got.tolist() == pytest.approx(want, abs=1e-4)
    assert all(a >= b for a, b in zip(want[:2], want[1:3]))  # a running minimum never rises within a solution


def test_likelihood_prm_learns_which_steps_are_wrong_and_loads_as_a_prm(tmp_path):
    rng = random.Random(0)

    def write(path, n):  # a step is wrong exactly when it says "bad", and every step after it too
        with open(path, "w") as f:
            for _ in range(n):
                slip = rng.choice([0, 1, 2, 3])  # 3: no slip
                steps = [f"{'bad' if t == slip else 'good'} {rng.randint(0, 1)}." for t in range(3)]
                f.write(json.dumps({"prompt": "go", "completions": steps, "labels": [t < slip for t in range(3)]}) + "\n")
        return str(path)

    out = rm.main(rm.Args(model="tiny", kind="prm", score="likelihood", min_prob=0.02, data=write(tmp_path / "a.jsonl", 64),
                          eval_data=write(tmp_path / "b.jsonl", 32), max_steps=30, batch_size=16, lr=3e-3, eval_every=0,
                          save_every=0, output_dir=str(tmp_path / "prm")))  # fmt: skip
    rows = metrics(out)
    assert rows[-1]["eval/step_accuracy"] >= 0.9 and rows[-1]["eval/step_accuracy"] > rows[0]["eval/step_accuracy"]
    loaded = common.load_reward_model(out, "prm")
    assert (loaded.config.reward_score, loaded.config.reward_min_prob) == ("likelihood_steps", 0.02)
    scores = rm.score_responses(loaded, common.load_tokenizer(out), "prm", ["go"], ["good 1. bad 0. good 1."], "\n", 4096, CPU)[0]
    assert scores[0] > 0 > scores[1] >= scores[2]
    with pytest.raises(common.UserError, match="not an rm.py outcome"):
        common.load_reward_model(out, "orm")


def test_a_policy_passed_as_a_reward_model_is_an_error_not_a_random_head(tmp_path, chatml):
    policy = str(tmp_path / "policy")
    common.save_model(common.tiny_model(chatml), chatml, policy)
    for kind in ("orm", "prm"):
        with pytest.raises(common.UserError, match="not an rm.py"):
            common.load_reward_model(policy, kind)


def test_prm_learns_which_steps_are_wrong(tmp_path):
    from transformers import AutoModelForTokenClassification

    rng = random.Random(0)

    def write(path, n):  # a step is wrong exactly when it says "bad"
        with open(path, "w") as f:
            for _ in range(n):
                labels = [rng.random() < 0.6 for _ in range(3)]
                steps = [f"{'good' if y else 'bad'} {rng.randint(0, 9)}." for y in labels]
                f.write(json.dumps({"prompt": "go", "completions": steps, "labels": labels}) + "\n")
        return str(path)

    out = rm.main(rm.Args(model="tiny", kind="prm", data=write(tmp_path / "a.jsonl", 64), eval_data=write(tmp_path / "b.jsonl", 32),
                          max_steps=30, batch_size=16, lr=3e-3, eval_every=0, save_every=0, output_dir=str(tmp_path / "prm")))  # fmt: skip
    rows = metrics(out)
    assert rows[-1]["eval/step_accuracy"] >= 0.95 and rows[-1]["eval/solution_accuracy"] >= 0.9
    assert rows[-1]["eval/step_accuracy"] > rows[0]["eval/step_accuracy"]
    assert AutoModelForTokenClassification.from_pretrained(out).config.num_labels == 1


@pytest.mark.parametrize(("kind", "score", "lr", "used"), [("orm", "head", None, 3e-5), ("orm", "likelihood", None, 1e-5),
                                                         ("prm", "likelihood", None, 3e-5), ("orm", "likelihood", 2e-4, 2e-4)])  # fmt: skip
def test_the_default_rate_is_gentler_for_a_likelihood_orm_and_args_json_shows_it(tmp_path, kind, score, lr, used):
    out = rm.main(rm.Args(model="tiny", kind=kind, score=score, lr=lr, num_train=8, num_eval=4, max_steps=1, save_every=0,
                          output_dir=str(tmp_path / "rm")))  # fmt: skip
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["lr"] == used


@pytest.mark.parametrize("score", ["head", "likelihood"])
def test_best_of_n_end_to_end_counts_greedy_samples_and_scorers(tmp_path, monkeypatch, score):
    orm = rm.main(rm.Args(model="tiny", score=score, num_train=8, num_eval=4, max_steps=1, save_every=0, output_dir=str(tmp_path / "orm")))
    prm = rm.main(
        rm.Args(model="tiny", kind="prm", score=score, num_train=8, num_eval=4, max_steps=1, save_every=0, output_dir=str(tmp_path / "prm"))
    )
    problems = common.builtin_prompts("test", 4)

    def canned(model, tok, prompts, max_new_tokens, temperature=0.0, batch_size=32, prefill=None, **kwargs):
        answer = {p["prompt"]: p["answer"] for p in problems}
        if temperature == 0:  # greedy: right on the first problem only
            return [{"text": f"The answer is {answer[p] + (i > 0)}."} for i, p in enumerate(prompts)]
        return [
            {"text": f"Step one. The answer is {answer[p] + (i % 4 != 0)}." if i % 4 != 3 else ""}
            for i, p in enumerate(prompts)
        ]

    monkeypatch.setattr(common, "generate", canned)
    out = rm.main(rm.Args(model="tiny", best_of_n=(2, 4), orm=orm, prm=prm, num_eval=4, output_dir=str(tmp_path / "bon")))
    with open(os.path.join(out, "best_of_n.json")) as f:
        r = json.load(f)
    # of each problem's 4 samples only the first is right (and the last is empty)
    assert r["bon/greedy"] == 0.25 and r["bon/sample"] == 0.25
    assert r["bon/pass@2"] == 0.5 and r["bon/pass@4"] == 1.0
    for key in ("orm", "prm_min", "prm_product", "orm_vote", "prm_vote"):
        for n in (2, 4):
            assert 0.0 <= r[f"bon/{key}@{n}"] <= r[f"bon/pass@{n}"]
    # majority vote: of 4, the wrong answer stated twice wins; of 2, the right first sample ties one wrong and wins
    assert r["bon/vote@4"] == 0.0 and r["bon/vote@2"] == 0.5
    with open(os.path.join(out, "best_of_n_samples.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 16 and sum(x["correct"] for x in rows) == 4 and {"orm", "prm_min", "prm_product"} <= rows[0].keys()


# ───────────── processes: torchrun, kill and resume ─────────────

CLI = ["--model", "tiny", "--num-train", "32", "--num-eval", "4", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "1"]


@pytest.mark.parametrize("score", ["head", "likelihood"])
def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path, score):
    check_two_processes_match_one("rm.py", CLI + ["--max-steps", "3", "--max-tokens", "600", "--score", score], tmp_path, lr=2e-3)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    check_resume_matches_uninterrupted("rm.py", CLI + ["--max-steps", "6", "--save-every", "3"], tmp_path, steps=6)


# ───────────── bad input ─────────────


def test_identical_and_empty_pairs_are_counted_skips_and_a_bad_margin_is_an_error(chatml, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "  ", "rejected": "b"},
        {"prompt": "p", "chosen": "a" * 500, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
    ]
    pairs, skipped = rm.tokenize_pairs(rows, chatml, max_tokens=200)
    assert skipped == {"identical": 1, "empty": 1, "too_long": 1} and len(pairs) == 1 and pairs[0]["margin"] == 2.0
    with pytest.raises(common.DataError, match="x.jsonl:3: field 'margin'"):
        rm.tokenize_pairs(
            [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big", "_where": "x.jsonl:3"}], chatml, 200
        )
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    with pytest.raises(ValueError, match="no usable training samples"):
        rm.main(rm.Args(model="tiny", data=str(path), max_steps=1, output_dir=str(tmp_path / "o")))


def test_bad_prm_rows_are_errors_or_counted_skips(chatml, tmp_path):
    path = tmp_path / "prm.jsonl"
    path.write_text('{"prompt": "p", "completions": ["a.", "b."], "labels": [true]}\n')
    with pytest.raises(common.DataError, match="prm.jsonl:1: fields 'completions' and 'labels' differ in length"):
        rm.main(rm.Args(model="tiny", kind="prm", data=str(path), max_steps=1, output_dir=str(tmp_path / "o")))
    rows = [{"prompt": "p", "completions": [], "labels": []}, {"prompt": "p", "completions": ["a.", " "], "labels": [1, 0]},
            {"prompt": "p", "completions": ["a." * 300], "labels": [1]}, {"prompt": "p", "completions": ["a."], "labels": [1]}]  # fmt: skip
    samples, skipped = rm.prm_samples(rows, chatml, "\n", max_tokens=200)
    assert skipped == {"empty": 2, "too_long": 1} and len(samples) == 1
    with pytest.raises(common.DataError, match="missing field 'answer'"):
        rm.mc_labelled(
            [{"prompt": "p", "completions": ["a."], "labels": [1], "_where": "f:1"}],
            rm.Args(model="tiny"),
            0,
            1,
            CPU,
            str(tmp_path),
        )


def test_best_of_n_scores_each_response_as_it_scores_alone(chatml):
    orm, prm = rm.reward_model("tiny", chatml, "orm", seed=0).eval(), rm.reward_model("tiny", chatml, "prm", seed=1).eval()
    prompts = ["q one", "q two", "q three", "q four"]
    texts = ["1 + 2 = 3. The answer is 3.", "", "The answer is 5.", "Two steps. Then the answer is 7."]
    cpu = torch.device("cpu")
    packed = rm.score_responses(orm, chatml, "orm", prompts, texts, "\n", 4096, cpu)
    steps = rm.score_responses(prm, chatml, "prm", prompts, texts, "\n", 4096, cpu)
    assert packed[1].numel() == 0 and steps[1].numel() == 0  # an empty answer has no score
    for i in (0, 2, 3):
        alone = rm.score_responses(orm, chatml, "orm", prompts[i : i + 1], texts[i : i + 1], "\n", 4096, cpu)[0]
        torch.testing.assert_close(packed[i], alone, atol=1e-5, rtol=1e-5)
        alone = rm.score_responses(prm, chatml, "prm", prompts[i : i + 1], texts[i : i + 1], "\n", 4096, cpu)[0]
        torch.testing.assert_close(steps[i], alone, atol=1e-5, rtol=1e-5)
        assert len(steps[i]) == len(rm.split_steps(texts[i]))


def test_transformers_scores_the_saved_reward_model_at_the_token_rm_trained_on(tmp_path, llama3):
    """pad = eos = <|eot_id|> and a template that ends with it: transformers' sequence classifier reads
    the last non-pad token, so rm.py must save a pad token that ends nothing."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = str(tmp_path / "base")
    common.tiny_model(llama3).save_pretrained(base)
    llama3.save_pretrained(base)
    out = rm.main(rm.Args(model=base, num_train=16, num_eval=4, max_steps=3, batch_size=8, lr=3e-3, save_every=0,
                          output_dir=str(tmp_path / "rm")))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    prompts, answers = ["2+2?", "What is 3 plus 4, please?"], ["4", "The answer is 7."]
    ours = common.reward_model_scores(common.load_reward_model(out), tok, prompts, answers, torch.device("cpu"))
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, its own attention
    texts = [tok.apply_chat_template(common.as_messages(p, a), tokenize=False) for p, a in zip(prompts, answers)]
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert enc["input_ids"][0, -1] == tok.pad_token_id  # the shorter one is padded
    with torch.no_grad():
        theirs = hf(**enc).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
