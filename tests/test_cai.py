"""Constitutional AI's supervised stage (cai.py): the critique and revision requests, the constitution,
the drop rule, and an end-to-end run whose preference pairs dpo.py then trains on.

    python -m pytest tests/test_cai.py
"""

import json

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, read_metrics

import cai
import common


@pytest.fixture
def model(tuned_tiny):
    """The tiny model fine-tuned on the built-in task (conftest): answers in the format, worth critiquing."""
    return tuned_tiny


def answerless(tmp_path, n: int = 24) -> str:
    """The built-in training prompts without their answers: no reward, so only empty answers and refusals are
    dropped and the tiny model's revisions (never right) are kept to train on."""
    path = tmp_path / "answerless.jsonl"
    path.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in common.builtin_prompts("train", n)))
    return str(path)


def tiny_args(tmp_path, model, **kw):
    base = {"model": model, "num_train": 64, "num_eval": 8, "batch_size": 8, "max_new_tokens": 12, "num_generate": 16,
            "lr": 3e-3, "warmup_steps": 1, "max_steps": 12, "max_epochs": 100.0, "save_every": 0,
            "output_dir": str(tmp_path / "run")}  # fmt: skip
    return cai.Args(**{**base, **kw})


# ───────────── critique, revision, the constitution and the drop rule ─────────────


def test_critique_and_revision_prompts_render_the_documented_templates():
    principle = {"name": "concise", "principle": "Say it in few words."}
    critique = cai.critique_conversation("What is 2 + 3?", "The answer is 5.", principle)
    assert critique == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "Critique your last answer against this principle: Say it in few words. "
                                    "Point out specifically where the answer falls short of it, if anywhere."},
    ]  # fmt: skip
    revision = cai.revision_conversation("What is 2 + 3?", "The answer is 5.", principle, "It is fine.")
    assert revision[:3] == critique
    assert revision[3:] == [
        {"role": "assistant", "content": "It is fine."},
        {"role": "user", "content": "Rewrite your last answer so that it follows the principle: Say it in few words. "
                                    "Use your critique, keep what was right, and reply with the rewritten answer only."},
    ]  # fmt: skip
    # a message-list prompt keeps its turns, and the chat template renders the whole exchange
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert cai.critique_conversation(system, "Hello", principle)[:2] == system


def test_the_constitution_reads_from_the_builtin_set_a_text_file_and_jsonl(tmp_path):
    names = [p["name"] for p in cai.read_constitution("builtin")]
    assert names == ["helpful", "correct", "harmless", "concise"]
    text = tmp_path / "c.txt"
    text.write_text("Be kind.\n\n  Be brief.  \n")
    assert cai.read_constitution(str(text)) == [{"name": "Be kind.", "principle": "Be kind."},
                                                    {"name": "Be brief.", "principle": "Be brief."}]  # fmt: skip
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"name": "kind", "principle": "Be kind."}\n{"principle": "Be brief."}\n')
    assert cai.read_constitution(str(jsonl))[0] == {"name": "kind", "principle": "Be kind."}
    jsonl.write_text('{"principle": "Be kind."}\n{"name": "brief"}\n')
    with pytest.raises(common.DataError, match=r"c.jsonl:2: missing field 'principle'"):
        cai.read_constitution(str(jsonl))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(common.DataError, match="no principles"):
        cai.read_constitution(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize(
    "revision, reward, original, reason",
    [
        ("", 1.0, 0.0, "empty"),
        ("  \n ", 1.0, 0.0, "empty"),
        ("I'm sorry, but I can't help with that.", 1.0, 0.0, "refusal"),
        ("As an AI, I will not do arithmetic.", 1.0, 0.0, "refusal"),
        ("I cannot answer this.", None, None, "refusal"),
        ("3 + 4 = 8. The answer is 8.", 0.1, 1.1, "reward"),  # was right, now wrong
        ("3 + 4 = 7. The answer is 7.", 1.1, 1.1, None),  # as good as the original: kept
        ("3 + 4 = 7. The answer is 7.", 1.1, 0.1, None),  # better
        ("The answer is 7. The answer is 7.", 1.1, 1.1, "working"),  # right, but the working is gone
        ("3+4=7, 7 × 2 = 14. The answer is 14.", 1.1, 1.1, None),  # steps written otherwise, one more: kept
        ("Seven.", None, None, None),  # no reward to compare (prompts without an answer)
        ("The answer is 7.", None, None, None),  # no reward: the working is not checked either
        ("The scan cannot be read.", None, None, None),  # "cannot" alone is not a refusal
    ],
)
def test_drop_reason_on_hand_made_revisions(revision, reward, original, reason):
    y0 = "Ava has 3 pens. 3 + 4 = 8. The answer is 8."  # one worked step
    assert cai.drop_reason(revision, reward, original, y0) == reason


@pytest.mark.parametrize(
    "revision, reward, original_right, reason",
    [
        ("11 + 7 = 18. 18 - 8 = 10. The answer is 10.", 1.1, False, None),  # wrong y0 made right, working true
        ("A step wrong, 18 - 8 = 5. 5 + 5 = 10. The answer is 10.", 1.1, False, "slip"),  # right answer, false step
        ("11 + 7 = 18. 18 - 8 = 7. The answer is 7.", 0.1, False, "slip"),  # y0 again, slip and all
        ("11 + 7 = 18. 18 − 8 = 10, so 18 - 8 = 10. The answer is 9.", 0.1, False, "unimproved"),  # true steps, still wrong
        ("11 + 7 = 18. 18 - 8 = 10. The answer is 10.", 1.1, True, None),  # a right y0 restated
        ("11 + 7 = 18. 18 - 8 = 10. The answer is 10.", 0.1, None, None),  # a reward model's tie: no "right" to lose
        ("6 × 3 = 18. 18 ÷ 4 = 4.5. 10 / 0 = 0. The answer is 4.5.", 1.1, False, "slip"),  # ÷ by 0 never holds
        ("6 × 3 = 18. 18 ÷ 4 = 4.5. 2.5 * 2 = 5. The answer is 5.", 1.1, False, None),
    ],
)
def test_a_revision_that_states_a_false_step_or_leaves_a_wrong_answer_wrong_is_dropped(revision, reward, original_right, reason):
    y0 = "Dan has 11 apples. 11 + 7 = 18. 18 - 8 = 7. The answer is 7."  # two worked steps, the second false
    assert cai.drop_reason(revision, reward, 0.1, y0, original_right) == reason


def test_a_chain_keeps_its_last_good_revision_and_the_counts_add_up():
    def row(y0, reward):
        return {"prompt": "p", "y0": y0, "y0_reward": reward, "y0_right": None, "final": y0, "rounds": [], "dropped": None}

    good_then_empty = row("The answer is 6.", 0.1)
    cai.add_round(good_then_empty, "correct", "6 is wrong", "The answer is 7.", 1.1)
    cai.add_round(good_then_empty, "concise", "ok", "", 0.0)
    assert good_then_empty["final"] == "The answer is 7." and good_then_empty["dropped"] == "empty"
    assert [r["dropped"] for r in good_then_empty["rounds"]] == [None, "empty"]
    worse = row("The answer is 7.", 1.1)
    cai.add_round(worse, "helpful", "too short", "The answer is 8.", 0.1)
    refused = row("The answer is 7.", 1.1)
    cai.add_round(refused, "harmless", "hm", "I'm sorry, I can't answer that.", 0.0)
    unchanged = row("The answer is 7.", 1.1)
    cai.add_round(unchanged, "correct", "fine", "The answer is 7.", 1.1)
    stripped = row("3 + 4 = 7. The answer is 7.", 1.1)
    cai.add_round(stripped, "concise", "shorter", "The answer is 7.", 1.1)
    rows = [good_then_empty, worse, refused, unchanged, stripped]
    assert [cai.revised(r) for r in rows] == [True, False, False, True, False]
    assert cai.preference_pairs(rows) == [{"prompt": "p", "chosen": "The answer is 7.", "rejected": "The answer is 6."}]
    assert cai.cai_stats(rows) == {"cai/prompts": 5, "cai/kept": 2, "cai/pairs": 1, "cai/dropped_empty": 1, "cai/dropped_refusal": 1,
                                   "cai/dropped_reward": 1, "cai/dropped_working": 1, "cai/dropped_slip": 0,
                                   "cai/dropped_unimproved": 0, "cai/unchanged": 1}  # fmt: skip


def test_cai_writes_its_chains_and_pairs_trains_on_them_and_dpo_trains_on_the_pairs(tmp_path, model):
    import dpo

    out = cai.main(tiny_args(tmp_path, model, data=answerless(tmp_path), revisions=2, max_steps=8))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "cai_data.jsonl")]
    assert [r["i"] for r in rows] == list(range(16)) and all(r["y0_reward"] is None and r["y0_right"] is None for r in rows)
    assert all(r["y0"] and 1 <= len(r["rounds"]) <= 2 and all("critique" in c for c in r["rounds"]) for r in rows)
    metrics = read_metrics(out)
    stats = {k: v for k, v in metrics[0].items() if k.startswith("cai/")}
    assert stats == cai.cai_stats(rows) | {"cai/overlong": 0} and stats["cai/kept"] > 0
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert losses[-1] < losses[0]  # the SFT loss on the revisions falls
    assert metrics[0]["eval/kl_k1"] == 0.0 and metrics[0]["eval/kl_k3"] == 0.0  # the model is its start
    assert metrics[-1]["eval/kl_k3"] > 0.0  # and then moves away from it
    tok = common.load_tokenizer(model)
    before, after = common.load_model(model, tok), common.load_model(out, tok)
    assert not torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)

    pairs = common.read_preferences(str(tmp_path / "run" / "cai_preferences.jsonl"))
    assert len(pairs) == stats["cai/pairs"] > 0
    assert pairs[0]["rejected"] == next(r["y0"] for r in rows if cai.revised(r) and r["final"] != r["y0"])
    dpo_out = dpo.main(dpo.Args(model=out, data=str(tmp_path / "run" / "cai_preferences.jsonl"), num_eval=4,
                                batch_size=4, max_steps=3, lr=1e-3, save_every=0, output_dir=str(tmp_path / "dpo")))  # fmt: skip
    assert [r["step"] for r in read_metrics(dpo_out) if "loss" in r] == [1, 2, 3]

    # --critic: another model critiques and revises; the answers y0 stay the model's own. The built-in prompts
    # carry their answers: the rule reward judges y0 and every revision, and the guard drops by it
    critic = tmp_path / "critic"
    common.tiny_model(tok, seed=1).save_pretrained(critic)
    tok.save_pretrained(critic)
    cai.main(tiny_args(tmp_path, model, max_steps=1, critic=str(critic), output_dir=str(tmp_path / "critic-run")))
    other = [json.loads(line) for line in open(tmp_path / "critic-run" / "cai_data.jsonl")]
    assert [r["y0"] for r in other] == [r["y0"] for r in rows]
    assert [r["rounds"][0]["critique"] for r in other] != [r["rounds"][0]["critique"] for r in rows]
    answers = [p["answer"] for p in common.builtin_prompts("train", 16)]
    assert [r["y0_right"] for r in other] == [common.rule_reward(r["y0"], a) >= 1 for r, a in zip(other, answers)]
    for r in other:
        first = r["rounds"][0]
        assert first["dropped"] == cai.drop_reason(first["revision"], first["reward"], r["y0_reward"], r["y0"], r["y0_right"])


def test_few_kept_revisions_train_for_max_epochs_over_them_and_none_kept_leaves_the_model_as_it_started(tmp_path, model, monkeypatch, capsys):
    kept = iter([True] * 3 + [False] * 100)  # the guard keeps the first three revisions and drops the rest
    monkeypatch.setattr(cai, "drop_reason", lambda *a: None if next(kept) else "reward")
    out = cai.main(tiny_args(tmp_path, model, batch_size=2, max_epochs=2.0, max_steps=12))
    assert "cai: 3 of 16 revisions kept: 3 steps (--max-epochs 2 over them) instead of --max-steps 12" in capsys.readouterr().out
    metrics = read_metrics(out)
    assert metrics[0]["cai/kept"] == 3 and [r["step"] for r in metrics if "loss" in r] == [1, 2, 3]  # ⌈2 · 3 / 2⌉
    tok = common.load_tokenizer(model)
    trained = lambda r: sum(t != common.IGNORE for t in common.tokenize_conversation(tok, common.as_messages(r["prompt"], r["final"]))["labels"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "cai_data.jsonl")]
    assert sum(r["answer_tokens"] for r in metrics if "loss" in r) == 2 * sum(trained(r) for r in rows if cai.revised(r))  # each seen twice

    monkeypatch.setattr(cai, "drop_reason", lambda *a: "reward")
    out = cai.main(tiny_args(tmp_path, model, output_dir=str(tmp_path / "none")))
    assert "0 steps (--max-epochs 100 over them) instead of --max-steps 12; the model is saved as it started" in capsys.readouterr().out
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [0] and metrics[0]["cai/kept"] == 0
    before, after = common.load_model(model, tok), common.load_model(out, tok)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


# ───────────── processes: torchrun, kill and resume ─────────────


def cli(model, tmp_path):
    return ["--model", model, "--data", answerless(tmp_path), "--num-eval", "4", "--batch-size", "8", "--max-new-tokens", "8",
            "--num-generate", "16", "--lr", "2e-3", "--max-epochs", "100"]  # fmt: skip


def test_two_gloo_processes_give_the_cai_weights_of_one_process(tmp_path, model):
    args = cli(model, tmp_path) + ["--revisions", "2", "--max-steps", "3", "--max-tokens", "200"]
    check_two_processes_match_one("cai.py", args, tmp_path, lr=2e-3)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, model):
    args = cli(model, tmp_path) + ["--max-steps", "6", "--save-every", "3"]
    check_resume_matches_uninterrupted("cai.py", args, tmp_path, steps=6)


def test_own_prompts_hold_out_the_last_num_eval_and_are_never_trained_on(tmp_path, model):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(12)))
    out = cai.main(tiny_args(tmp_path, model, data=str(data), num_eval=4, max_steps=2))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "cai_data.jsonl")]
    assert [r["prompt"] for r in rows] == [f"Say {i}." for i in range(8)]
    assert all(r["y0_reward"] is None for r in rows)  # no answer, no reward model: nothing to compare
    assert "eval/kl_k1" in read_metrics(out)[-1] and "eval/accuracy" not in read_metrics(out)[-1]
    with pytest.raises(common.UserError, match="too few to hold out --num-eval 12"):
        cai.main(tiny_args(tmp_path, model, data=str(data), num_eval=12, output_dir=str(tmp_path / "few")))
