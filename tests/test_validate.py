"""The validated-runs runner's pure parts: pass@k, standard errors, the README table."""

import itertools
import json
import math

import pytest

import validate


@pytest.mark.parametrize("n,c,k", [(4, 0, 4), (4, 1, 4), (4, 4, 1), (10, 3, 2), (10, 3, 5), (6, 5, 3)])
def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_include_a_right_one(n, c, k):
    right = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(right[i] for i in s) for s in subsets) / len(subsets)  # every k-subset equally likely
    assert validate.pass_at_k(n, c, k) == pytest.approx(brute)


def test_mean_and_standard_error_by_hand():
    m, se = validate.mean_se([1.0, 0.0, 1.0, 1.0])  # p = 0.75, sample variance 0.25, SE = √(0.25 / 4)
    assert (m, se) == pytest.approx((0.75, 0.25))
    assert validate.mean_se([1.0]) == (1.0, 0.0)  # one value: no spread to estimate
    paired = validate.mean_se([b - a for a, b in zip([0, 1, 0, 1], [1, 1, 0, 1])])  # one problem flipped to right
    assert paired == pytest.approx((0.25, math.sqrt(0.25 * 0.75 * 4 / 3 / 4)))


def test_table_row_shows_means_with_standard_errors_and_times():
    ev = {"accuracy": 0.2, "accuracy_se": 0.025, "format": 0.9, "pass@4": 0.4}
    row = {"name": "grpo", "command": "python grpo.py --model <sft5 start>", "before": ev,
           "after": dict(ev, accuracy=0.35, accuracy_se=0.03, format=1.0, **{"pass@4": 0.5}), "gain": 0.15,
           "gain_se_paired": 0.02, "run_wall_s": 1501.0, "peak_rss_gb": 12.34}  # fmt: skip
    table = validate.table([row]).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[2].count("|")
    assert "0.200 ± 0.025 → 0.350 ± 0.030" in table[2] and "+0.150 (0.020)" in table[2]
    assert "| 25:01 | 12.3 |" in table[2]
    # a run evaluated on the wide problems too: a column with its accuracy there, "–" for the others
    wide = dict(row, name="kd", wide={"first": 512, "problems": 1012, "accuracy": 0.25, "accuracy_se": 0.014})
    table = validate.table([row, wide]).splitlines()
    assert "greedy accuracy after, test problems 512–1523 |" in table[0] and len({t.count("|") for t in table}) == 1
    assert "| – | 25:01 |" in table[2] and "| 0.250 ± 0.014 | 25:01 |" in table[3]


def test_table_row_shows_the_paired_format_change_where_the_start_kept_per_problem_formats():
    ev = {"accuracy": 0.0, "accuracy_se": 0.0, "format": 0.1, "pass@4": 0.0}
    row = {"name": "dpo", "command": "python dpo.py --beta 0.1 --model <base start>", "before": ev,
           "after": dict(ev, format=0.4), "gain": 0.0, "gain_se_paired": 0.0, "format_gain": 0.3,
           "format_gain_se_paired": 0.031, "run_wall_s": 600.0, "peak_rss_gb": 5.0}  # fmt: skip
    assert "| 0.100 → 0.400 (+0.300, SE 0.031) |" in validate.table([row]).splitlines()[2]
    assert "SE" not in validate.table([dict(row, format_gain=None)]).splitlines()[2].split("|")[5]


def test_two_runs_are_compared_problem_by_problem():
    run = lambda name, right: {"name": name, "after": {"right": right}}  # noqa: E731
    diff = validate.paired_difference(run("a", [1, 1, 0, 1]), run("b", [0, 1, 0, 1]))  # a has one more right
    assert diff == pytest.approx(validate.mean_se([1, 0, 0, 0]))
    assert diff[0] == pytest.approx(0.25)
    with pytest.raises(SystemExit, match="b has no per-problem results"):
        validate.paired_difference(run("a", [1]), {"name": "b", "after": {}})
    # seeds pooled: each problem's mean over the runs, then paired as one run
    both = validate.pooled([run("a", [1, 1, 0, 1]), run("a-seed1", [0, 1, 0, 0])])
    assert both["after"]["right"] == [0.5, 1.0, 0.0, 0.5] and both["name"] == "a+a-seed1"
    assert validate.paired_difference(both, run("b", [0, 1, 0, 1]))[0] == pytest.approx((0.5 + 0 + 0 - 0.5) / 4)
    # and a student's per-problem reverse KL, where every seed has one
    kl = lambda name, right, per: run(name, right) | {"kl": {"after": {"per_problem": per}}}  # noqa: E731
    assert validate.pooled([kl("a", [1], [0.2]), kl("a-seed1", [0], [0.4])])["kl"]["after"]["per_problem"] == pytest.approx([0.3])
    assert "kl" not in validate.pooled([kl("a", [1], [0.2]), run("a-seed1", [0])])


def test_reward_models_are_evaluated_on_the_reported_problems_against_their_baselines(tmp_path, monkeypatch):
    import common
    import rm
    import torch

    monkeypatch.setattr(validate, "EVAL_N", 6)  # problems 6..11 of the test split
    orm = rm.main(rm.Args(model="tiny", num_train=8, num_eval=4, max_steps=1, save_every=0, output_dir=str(tmp_path / "orm")))
    prm = rm.main(rm.Args(model="tiny", kind="prm", num_train=8, num_eval=4, max_steps=1, save_every=0,
                          output_dir=str(tmp_path / "prm")))  # fmt: skip
    tok, cpu = common.load_tokenizer("tiny"), torch.device("cpu")
    ev = validate.evaluate_rm(orm, "orm")
    model = common.load_reward_model(orm, "orm")
    pairs = common.builtin_preferences("test", 12, 0)[6:]
    for pair, right in zip(pairs, ev["right"]):  # each pair scored on its own, unpacked
        w, lose = (rm.score_responses(model, tok, "orm", [pair["prompt"]], [t], "\n", 4096, cpu)[0] for t in (pair["chosen"], pair["rejected"]))
        assert right == float(w[0] > lose[0])
    assert (ev["problems"], ev["pairwise_accuracy"]) == (6, sum(ev["right"]) / 6)
    ev = validate.evaluate_rm(prm, "prm")
    rows = common.builtin_prm("test", 12, 0)[6:]
    labels = [y for r in rows for y in r["labels"]]
    assert ev["steps"] == len(labels) == 24 and ev["step_accuracy_baseline"] == sum(labels) / 24
    assert ev["solution_accuracy_baseline"] == sum(all(r["labels"]) for r in rows) / 6
    model = common.load_reward_model(prm, "prm")
    s = [rm.score_responses(model, tok, "prm", [r["prompt"]], [" ".join(r["completions"])], "\n", 4096, cpu)[0] for r in rows]
    steps_right = [float((x > 0) == y) for r, t in zip(rows, s) for x, y in zip(t.tolist(), r["labels"])]
    assert ev["step_accuracy"] == pytest.approx(sum(steps_right) / 24)
    assert ev["step_accuracy_over_baseline"] == pytest.approx(ev["step_accuracy"] - ev["step_accuracy_baseline"])
    assert ev["solution_accuracy"] == pytest.approx(sum(float((t.min() > 0) == all(r["labels"])) for r, t in zip(rows, s)) / 6)
    row = {"name": "prm", "kind": "prm", "command": "python rm.py --kind prm", "after": ev, "run_wall_s": 61.0, "peak_rss_gb": 4.0}
    line = validate.rm_table([row]).splitlines()[2]
    assert f"step accuracy {ev['step_accuracy']:.3f}" in line and f"every step right: {ev['step_accuracy_baseline']:.3f}" in line
    assert "| 1:01 | 4.0 |" in line
    fit = validate.evaluate_rm(prm, "prm", "train")  # the first EVAL_N problems it trained on, not the held-out ones
    rows = common.builtin_prm("train", 6, 0)
    assert fit["steps"] == sum(len(r["labels"]) for r in rows) and fit["step_accuracy_baseline"] == pytest.approx(
        sum(y for r in rows for y in r["labels"]) / fit["steps"])  # fmt: skip
    line = validate.rm_table([row | {"train_fit": fit}]).splitlines()[2]
    held_out, trained = line.split("; on 6 of its training problems: ")
    assert f"step accuracy {ev['step_accuracy']:.3f}" in held_out and f"step accuracy {fit['step_accuracy']:.3f}" in trained


def test_a_likelihood_orm_is_shown_against_its_start_scored_the_same_way_untrained(tmp_path, monkeypatch):

    import common
    import rm

    monkeypatch.setattr(validate, "EVAL_N", 6)
    tok = common.tiny_tokenizer()
    start = str(tmp_path / "start")
    common.save_model(common.tiny_model(tok), tok, start)
    lm = common.load_model(start)
    mean_logp = lambda p, a: common.mean_logps(lm, common.collate_packed([common.tokenize_conversation(  # noqa: E731
        tok, common.as_messages(p, a), 1)])).item()
    pairs = common.builtin_preferences("test", 12, 0)[6:]
    orm = rm.main(rm.Args(model=start, score="likelihood", num_train=8, num_eval=4, max_steps=2, lr=1e-2, save_every=0,
                          output_dir=str(tmp_path / "orm")))  # fmt: skip
    after, before = validate.evaluate_rm(orm, "orm"), validate.evaluate_rm(start, "orm", untrained_as=orm)
    assert before["right"] == [float(mean_logp(r["prompt"], r["chosen"]) > mean_logp(r["prompt"], r["rejected"])) for r in pairs]
    row = {"name": "orm-likelihood", "kind": "orm", "command": "python rm.py --score likelihood", "before": before, "after": after,
           "run_wall_s": 5.0, "peak_rss_gb": 1.0}  # fmt: skip
    line = validate.rm_table([row]).splitlines()[2]
    gain, se = validate.paired(after["right"], before["right"])
    assert f"{before['pairwise_accuracy']:.3f} ± {before['pairwise_accuracy_se']:.3f} → {after['pairwise_accuracy']:.3f}" in line
    assert f"gain {gain:+.3f}, paired SE {se:.3f}" in line
    samples = [{"prompt": r["prompt"], "text": t} for r in pairs[:2] for t in (r["chosen"], "")]
    (tmp_path / "bon").mkdir()
    (tmp_path / "bon" / "best_of_n_samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    got = validate.untrained_bon_scores(str(tmp_path / "bon"), start, orm)
    beta = rm.Args().beta
    assert got[0] == pytest.approx(beta * mean_logp(pairs[0]["prompt"], pairs[0]["chosen"]), abs=1e-4) and got[1] == float("-inf")


def test_a_run_is_written_as_one_json_with_its_paired_gain_or_its_reward_model_evaluation(tmp_path, monkeypatch):
    """validate() end to end with the subprocess and the evaluations stubbed: what lands in the JSON."""
    import os

    monkeypatch.setattr(validate, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(validate, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(validate, "git_commit", lambda: "abc1234")
    before = {"accuracy": 0.25, "accuracy_se": 0.2, "right": [0, 1, 0, 0], "formatted": [1, 1, 0, 1], "eval_s": 1.0}
    monkeypatch.setattr(validate, "start_dir", lambda start, threads: ("START", {"command": "python sft.py", "eval": before}))

    ran = []

    def fake_run(cmd, log, threads):  # the script: writes its metrics where validate() reads them
        ran.append(cmd)
        out = cmd[cmd.index("--output-dir") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "loss": 0.5}) + "\n\n")  # a blank line is skipped
        return 90.0, 3.5

    monkeypatch.setattr(validate, "run", fake_run)
    monkeypatch.setattr(validate, "evaluate", lambda out: {"accuracy": 0.75, "accuracy_se": 0.25, "right": [1, 1, 0, 1], "formatted": [1, 1, 1, 1], "eval_s": 2.0})
    r = validate.validate("grpo", 1, 2)
    assert r == json.loads((tmp_path / "results" / "grpo-seed1.json").read_text())
    assert r["command"] == "python grpo.py --prompts-per-step 4 --max-steps 20 --seed 1 --model <sft5 start>" and r["name"] == "grpo-seed1"
    assert ran[-1][5:9] == ["--seed", "1", "--model", "START"]
    assert (r["gain"], r["format_gain"]) == (pytest.approx(0.5), pytest.approx(0.25))  # two problems turned right, one formatted
    assert "right" not in r["before"] and r["after"]["right"] == [1, 1, 0, 1]
    assert (r["run_wall_s"], r["eval_wall_s"], r["peak_rss_gb"], r["metrics"]) == (90.0, 2.0, 3.5, [{"step": 1, "loss": 0.5}])
    r = validate.validate("rft", 0, 2)  # distill.py has no --model: the start goes where its arguments name it
    assert "--model" not in ran[-1] and ran[-1][ran[-1].index("--teacher") + 1] == ran[-1][ran[-1].index("--student") + 1] == "START"
    assert r["command"].startswith("python distill.py --mode rft --teacher <sft5 start> --student <sft5 start>")

    monkeypatch.setattr(validate, "evaluate_rm", lambda out, kind: {"kind_seen": kind, "pairwise_accuracy": 0.6, "pairwise_accuracy_se": 0.1, "eval_s": 4.0})
    r = validate.validate("orm", 0, 2)
    assert (r["kind"], r["after"]["kind_seen"], r["eval_wall_s"]) == ("orm", "orm", 4.0)
    assert "gain" not in r and "before" not in r
    assert r == json.loads((tmp_path / "results" / "orm.json").read_text())


def test_a_start_made_from_other_starts_and_a_students_reverse_kl_to_its_teacher(tmp_path, monkeypatch):
    import common
    import distill
    import torch

    made = []
    monkeypatch.setattr(validate, "start_dir", lambda name, threads: (made.append(name) or f"DIR-{name}", {}))
    args = validate.CONFIGS["kd-then-onpolicy"][1]
    resolved = validate.with_starts(args, "kd", 2)
    assert resolved[resolved.index("--teacher") + 1] == "DIR-rft" and resolved[resolved.index("--student") + 1] == "DIR-kd"
    assert made == ["rft", "kd"] and validate.start_of("--lr") == ""
    monkeypatch.setattr(validate, "RUNS", str(tmp_path / "runs"))
    with pytest.raises(SystemExit, match="run `python tests/validate.py orm` first"):
        validate.with_starts(["--orm", "<run:orm>"], "sft5", 2)
    path = validate.with_starts(["<reported:3>"], "sft5", 2)[0]
    assert common.read_prompts(path)[2]["answer"] == validate.reported_problems()[2]["answer"] and len(common.read_prompts(path)) == 3
    assert validate.command(args, "kd").startswith("python distill.py --mode on-policy --teacher <rft start> --student <kd start>")
    monkeypatch.undo()

    # a start that is a configuration's run: that run's directory, evaluated once per run (keyed by its metrics)
    monkeypatch.setattr(validate, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setitem(validate.STARTS, "after-kd", ["<run:kd-token>"])
    evaluated = []
    monkeypatch.setattr(validate, "evaluate", lambda model: evaluated.append(model) or {"accuracy": 0.5})
    run_dir = tmp_path / "runs" / "kd-token"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    model, info = validate.start_dir("after-kd", 2)
    assert model == str(run_dir) and info["command"] == "the kd-token run" and info["eval"] == {"accuracy": 0.5}
    assert validate.start_dir("after-kd", 2)[0] == str(run_dir) and evaluated == [str(run_dir)]  # cached
    (run_dir / "metrics.jsonl").write_text('{"step": 2}\n')  # the run was made again: evaluated again
    validate.start_dir("after-kd", 2)
    assert evaluated == [str(run_dir)] * 2
    monkeypatch.undo()

    monkeypatch.setattr(validate, "EVAL_N", 3)  # problems 3..5 of the test split
    tok = common.load_tokenizer("tiny")
    for seed, name in ((0, "student"), (1, "teacher")):
        common.tiny_model(tok, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    same = validate.evaluate_kl(str(tmp_path / "student"), str(tmp_path / "student"))
    assert same["per_problem"] == [0.0, 0.0, 0.0]
    kl = validate.evaluate_kl(str(tmp_path / "student"), str(tmp_path / "teacher"))
    student, teacher = (common.load_model(str(tmp_path / n), tok).eval() for n in ("student", "teacher"))
    problem = common.builtin_task("test", 6, 0)[3]
    text = common.generate(student, tok, [problem["prompt"]], 64, temperature=1.0, seeds=[common.hash_int(["reverse kl", 0])])[0]["text"]
    sample = common.tokenize_conversation(tok, common.as_messages(problem["prompt"], text))
    ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
    at = labels[1:] != common.IGNORE  # position t predicts token t + 1
    with torch.no_grad():
        logp_s, logp_t = (m(ids).logits[0, :-1][at].float().log_softmax(-1) for m in (student, teacher))
    by_hand = (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean()
    assert kl["per_problem"][0] == pytest.approx(float(by_hand), rel=1e-4) and kl["mean"] > 0
    assert distill.Args().temperature == 1.0  # the divergence the runner reads is at τ = 1

    # K answers a problem: the first is the one-answer measurement's, and a problem's value is the mean over its K
    three = validate.evaluate_kl(str(tmp_path / "student"), str(tmp_path / "teacher"), samples=3)
    assert three["samples"] == 3 and len(three["per_problem"]) == 3
    more = []
    for k in (1, 2):
        seed = common.hash_int(["reverse kl", 0, k])
        text = common.generate(student, tok, [problem["prompt"]], 64, temperature=1.0, seeds=[seed])[0]["text"]
        doc = common.collate_packed([common.tokenize_conversation(tok, common.as_messages(problem["prompt"], text))])
        total, n = distill.answer_divergence(student, teacher, doc, ("reverse",), distill.Args())
        more.append(float(total[0]) / n if n else 0.0)
    assert three["per_problem"][0] == pytest.approx((kl["per_problem"][0] + sum(more)) / 3, rel=1e-4)
    assert len(set(more + [kl["per_problem"][0]])) == 3  # three different answers


def test_a_students_reverse_kl_is_measured_again_with_more_answers_keeping_the_first_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "RESULTS", str(tmp_path))
    monkeypatch.setattr(validate, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(validate, "start_dir", lambda name, threads: (f"DIR-{name}", {}))
    first = {"mean": 0.5, "se": 0.1, "per_problem": [0.5]}
    (tmp_path / "kd-then-token-seed2.json").write_text(json.dumps({"name": "kd-then-token-seed2", "kl": {"before": first, "after": first}}))
    calls = []
    monkeypatch.setattr(validate, "evaluate_kl", lambda s, t, samples: calls.append((s, t, samples)) or {"mean": 0.4, "se": 0.05, "samples": samples})
    validate.remeasure_kl("kd-then-token-seed2", 4)
    validate.remeasure_kl("kd-then-token-seed2", 8)  # a second time: the one-answer measurement is still the first
    kl = json.loads((tmp_path / "kd-then-token-seed2.json").read_text())["kl"]
    assert calls == [(str(tmp_path / "runs" / "kd-then-token-seed2"), "DIR-rft", 4), (str(tmp_path / "runs" / "kd-then-token-seed2"), "DIR-rft", 8)]
    assert kl["after_one_sample"] == first and kl["before"] == first and kl["after"]["samples"] == 8


def test_runs_are_evaluated_again_on_the_rest_of_the_test_split_and_compared_there(tmp_path, monkeypatch, capsys):
    import common

    monkeypatch.setattr(validate, "RESULTS", str(tmp_path))
    monkeypatch.setattr(validate, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(validate, "git_commit", lambda: "abc1234")
    monkeypatch.setattr(validate, "EVAL_N", 2)  # reported: test problems 2..3; wide: 4..6
    monkeypatch.setattr(validate, "WIDE_N", 3)
    tok = common.load_tokenizer("tiny")
    common.tiny_model(tok, seed=0).save_pretrained(tmp_path / "runs" / "a")
    tok.save_pretrained(tmp_path / "runs" / "a")
    after = {"accuracy": 0.5, "right": [1.0, 0.0]}
    (tmp_path / "a.json").write_text(json.dumps({"name": "a", "after": after}))
    wide = validate.evaluate_wide("a")["wide"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"name": "a", "after": after, "wide": wide}  # the reported set's untouched
    problems = common.builtin_task("test", 7, 0)[4:]
    model = common.load_model(str(tmp_path / "runs" / "a"), tok).eval()
    texts = [g["text"] for g in common.generate(model, tok, [p["prompt"] for p in problems], 64)]
    assert wide["right"] == [common.rule_reward(t, p["answer"]) for t, p in zip(texts, problems)]
    assert wide["formatted"] == [common.format_reward(t) for t in texts]
    assert (wide["first"], wide["problems"], wide["commit"]) == (4, 3, "abc1234") and wide["accuracy"] == sum(wide["right"]) / 3

    # compare --wide pairs the wide lists, pooled over the seeds and seed by seed; the reported lists without it
    def result(name, right, wide_right):
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "after": {"right": right}, "wide": {"right": wide_right}}))

    result("k", [1, 1], [1, 1, 0, 1])
    result("k-seed1", [1, 0], [0, 1, 0, 1])
    result("s", [0, 1], [0, 1, 0, 1])
    result("s-seed1", [0, 0], [0, 1, 0, 0])
    validate.compare("k,k-seed1", "s,s-seed1", wide=True)
    out = capsys.readouterr().out
    assert "on 4 problems from test problem 4: accuracy +0.250 (paired SE 0.144)" in out  # (0.5, 0, 0, 0.5) by problem
    assert "seed by seed: +0.250, +0.250; their mean +0.250 (SE over the seeds 0.000)" in out
    validate.compare("k,k-seed1", "s,s-seed1")
    assert "on 2 problems: accuracy +0.500 (paired SE 0.500)" in capsys.readouterr().out  # (1, 0) by problem
    (tmp_path / "n.json").write_text(json.dumps({"name": "n", "after": {"right": [1, 1]}}))
    with pytest.raises(SystemExit, match="n has no evaluation on the wide problems"):
        validate.compare("k", "n", wide=True)


def test_best_of_n_is_read_from_the_samples_problem_by_problem_with_what_each_scorer_prefers(tmp_path):

    # 2 problems × 4 samples; the ORM prefers the longest answer, right or not
    texts = [("4 + 1 = 5. The answer is 5.", 1.0), ("The answer is 6. The answer is 6.", 0.0), ("The answer is 5.", 1.0), ("Five.", 0.0),
             ("2 + 2 = 4. The answer is 4.", 1.0), ("2 + 2 = 5. The answer is 5.", 0.0), ("I think 4.", 0.0), ("The answer is 9.", 0.0)]  # fmt: skip
    rows = [{"prompt": "p", "answer": 5, "text": t, "correct": c, "orm": float(len(t))} for t, c in texts]
    (tmp_path / "best_of_n_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = validate.evaluate_bon(str(tmp_path), [2, 4])
    assert out["sample_accuracy"][0] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # groups of 2: problem 0 picks sample 1 (wrong) and 2 (right); problem 1 picks 0 or 1 — tied lengths, the first: right — and 3 (wrong)
    assert out["orm@2"]["per_problem"] == [0.5, 0.5] and out["orm@4"]["per_problem"] == [0.0, 1.0]
    assert out["pass@2"]["per_problem"] == [1.0, 0.5] and out["pass@4"]["per_problem"] == [1.0, 1.0]
    assert out["orm@4"]["over_one_sample"][0] == pytest.approx(((0 - 0.5) + (1 - 0.25)) / 2)
    picked = out["prefers"]["orm"]  # the longest of each problem's 4: samples 1 and 4
    assert picked["chars"] == (len(texts[1][0]) + len(texts[4][0])) / 2 and picked["format"] == 1.0 and picked["repeats"] == 0.5
    assert out["prefers"]["all samples"]["format"] == 6 / 8 and picked["right"] == 0.5
    assert picked["steps"] == (2 + 2) / 2 and picked["false_step"] == 0.0 and out["prefers"]["all samples"]["false_step"] == 1 / 8
    # right above wrong: problem 0, right {0, 2} against wrong {1, 3}: 27 > 33? no, 27 > 5 yes, 17 > 33 no, 17 > 5 yes;
    # problem 1, right {4} against wrong {5, 6, 7}: a tie (half), 27 > 10 yes, 27 > 16 yes
    assert picked["right_above_wrong"] == pytest.approx((2 + 2.5) / (4 + 3))
    # weighted best-of-N. Stated answers: problem 0 (5, 6, 5, none), problem 1 (4, 5, none, 9). Majority vote of 4: 5
    # twice (right); one each, the first: 4 (right). Of 2: 5 over 6 on the tie, 5 over none; 4 over 5, then 9 (wrong)
    assert out["vote@4"]["per_problem"] == [1.0, 1.0] and out["vote@2"]["per_problem"] == [1.0, 0.5]
    # the ORM's weights exp(length): 6 (e^33) outweighs 5 (e^27 + e^17); 4 and 5 tie at e^27, the first
    assert out["orm_vote@4"]["per_problem"] == [0.0, 1.0]
    assert out["prefers"]["vote"]["right"] == 1.0 and out["prefers"]["orm_vote"]["chars"] == picked["chars"]
    shortest = validate.evaluate_bon(str(tmp_path), [2, 4], {"orm_untrained": [-float(len(t)) for t, _ in texts]})
    assert "orm_untrained_vote@4" in shortest and "prm_vote@4" not in shortest
    assert shortest["orm_untrained@4"]["per_problem"] == [0.0, 0.0] and shortest["orm@4"] == out["orm@4"]  # "Five.", "I think 4."
    line = validate.rm_cell({"after": out})
    assert line.startswith("2 problems × 4 samples; one sample 0.375") and "orm: @2 0.500 (+0.125, SE " in line
