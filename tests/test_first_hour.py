"""What a new user sees: named progress bars for every long phase, a summary at the end, metrics that
exist only when measured, one-line errors, a clean output directory, the data formats they bring.

    python -m pytest tests/test_first_hour.py
"""

import json
import os
import stat

import pytest
from helpers import read_metrics, run_script, synthetic_preferences

import common
import distill
import rm

TINY = ["--model", "tiny", "--num-train", "16", "--num-eval", "4", "--batch-size", "4", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tuned_tiny):
    out = tmp_path_factory.mktemp("dpo") / "run"  # the default data: the model's own answers rejected, so a model that writes some
    cli = ["--model", tuned_tiny] + TINY[2:-2] + ["--max-new-tokens", "8", "--max-steps", "4", "--save-every", "2"]
    r = run_script("dpo.py", cli + ["--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_every_long_phase_shows_a_named_progress_bar(dpo_run):
    _, r = dpo_run
    for phase in ("reference log-probs (train)", "reference log-probs (eval)", "held-out log-probs", "held-out greedy accuracy"):
        assert phase in r.stderr, phase


def test_a_run_ends_with_a_summary_of_what_it_did_and_where_the_model_is(dpo_run):
    out, r = dpo_run
    summary = r.stdout[r.stdout.index("done: 4 steps") :]
    assert "held-out" in summary and "step 0" in summary and "step 4" in summary
    assert "eval/rewards/accuracies" in summary and "peak memory" in summary
    assert f"saved to {out}" in summary and f"AutoModelForCausalLM.from_pretrained('{out}')" in summary


def test_checkpoints_go_after_the_final_save_and_the_weights_are_readable_by_others(dpo_run):
    out, _ = dpo_run
    assert not [p for p in os.listdir(out) if p.startswith(("checkpoint-", "latest"))]
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) & 0o044 == 0o044


def test_checkpoints_are_named_by_steps_done_and_kept_on_request(tmp_path):
    out = tmp_path / "run"
    r = run_script("sft.py", TINY + ["--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]


def test_untrained_dpo_reports_its_ties_as_ties(dpo_run):
    out, _ = dpo_run
    first = next(r for r in read_metrics(out) if "eval/rewards/accuracies" in r)
    assert first["step"] == 0 and first["eval/rewards/ties"] == 1.0 and first["eval/rewards/accuracies"] == 0.0


def test_a_metric_measured_on_nothing_is_absent(tmp_path):
    """rm.py on a user's file without --eval-data has nothing held out: no eval/accuracy = 0."""
    data = synthetic_preferences(tmp_path / "pairs.jsonl", 16, 0)
    args = rm.Args(model="tiny", data=data, max_steps=2, batch_size=4, save_every=0, output_dir=str(tmp_path / "run"))
    rows = read_metrics(rm.main(args))
    assert rows and not [k for r in rows for k in r if k.startswith("eval/")]


def test_a_data_error_is_one_line_and_a_non_zero_exit(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "a"}\n{"prompt": 5, "completion": "a"}\n')
    r = run_script("sft.py", ["--model", "tiny", "--data", str(bad), "--output-dir", str(tmp_path / "run")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'prompt' has type int"
    assert "Traceback" not in r.stderr


def test_a_used_output_directory_is_one_line_too(dpo_run):
    out, _ = dpo_run
    r = run_script("dpo.py", TINY + ["--max-steps", "1", "--output-dir", str(out)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {out} is not empty")


def test_a_byte_order_mark_and_trls_implicit_prompt_are_read(tmp_path):
    path = tmp_path / "pairs.jsonl"
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    row = {"chosen": convo + [{"role": "assistant", "content": "4"}], "rejected": convo + [{"role": "assistant", "content": "5"}]}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    [read] = common.read_preferences(str(path))
    assert read["prompt"] == convo
    assert read["chosen"] == [{"role": "assistant", "content": "4"}] and read["rejected"] == [{"role": "assistant", "content": "5"}]


def test_an_implicit_prompt_needs_a_shared_start(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(common.DataError, match="pairs.jsonl:1: no field 'prompt', and 'chosen' and 'rejected' share no"):
        common.read_preferences(str(path))


def test_distill_measures_the_held_out_kl_on_the_users_data(tmp_path):
    """With --data and --eval-data, the teacher answers the user's held-out prompts, not the built-in ones."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": f"{w}!"}) + "\n" for w in "abcdefgh"))
    held.write_text("".join(json.dumps({"prompt": f"repeat {w}", "completion": f"{w}{w}"}) + "\n" for w in "xyz"))
    teacher = str(tmp_path / "teacher")
    common.tiny_model(common.tiny_tokenizer(), layers=3).save_pretrained(teacher)
    common.tiny_tokenizer().save_pretrained(teacher)
    out = distill.main(distill.Args(teacher=teacher, student_layers=2, data=str(train), eval_data=str(held), max_steps=2,
                                    batch_size=4, max_new_tokens=4, save_every=0, output_dir=str(tmp_path / "run")))  # fmt: skip
    rows = [json.loads(line) for line in open(os.path.join(out, "eval_data.jsonl")) if line.strip()]
    texts = [common.tiny_tokenizer().decode(r["input_ids"]) for r in rows]  # the teacher's answers, after their prompts
    assert len(texts) == 3 and all("repeat" in t for t in texts)
    assert "eval/kl_forward_data" in read_metrics(out)[0]


def test_distill_refuses_a_student_with_all_the_teachers_layers(tmp_path):
    with pytest.raises(common.UserError, match="--student-layers 10 keeps all 2 of the teacher's layers"):
        distill.main(distill.Args(teacher="tiny", max_steps=1, output_dir=str(tmp_path / "run")))


def test_the_cache_follows_xdg_cache_home_and_cleanpost_cache_wins(monkeypatch, tmp_path):
    monkeypatch.delenv("CLEANPOST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert common.cache_dir() == str(tmp_path / "xdg" / "cleanpost")
    monkeypatch.setenv("CLEANPOST_CACHE", str(tmp_path / "mine"))
    assert common.cache_dir() == str(tmp_path / "mine")


def test_merge_without_models_says_what_it_needs_in_one_line(tmp_path):
    r = run_script("merge.py", ["--out", str(tmp_path / "m")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --models is required")


def test_the_step_separator_is_typed_and_shown_as_an_escape():
    r = run_script("rm.py", ["--help"])
    assert "(default: '\\n')" in r.stdout
    assert rm.step_separator(rm.Args()) == "\n" and rm.step_separator(rm.Args(step_sep="\\t;")) == "\t;"


def test_no_allocator_note_in_a_run(dpo_run):
    _, r = dpo_run
    assert "mallopt" not in r.stdout + r.stderr
