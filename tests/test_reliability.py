"""Reliability across kills: a run SIGKILLed at random moments (start-up, steps, checkpoint writes) and
continued with --resume ends exactly where an uninterrupted run ends, for sft.py and for an RL script.

    python -m pytest tests/test_reliability.py
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import ENV, ROOT, check_kill_anywhere, read_metrics, run_script, tiny_reward_model

import common
import distill
import dpo
import rm
import sft
import variants

SFT = ["--model", "tiny", "--num-train", "64", "--num-eval", "2", "--batch-size", "8", "--lr", "3e-3",
       "--max-new-tokens", "2", "--warmup-steps", "1", "--max-steps", "12", "--save-every", "1"]  # fmt: skip


def test_sft_killed_at_ten_random_moments_ends_as_an_uninterrupted_run(tmp_path):
    check_kill_anywhere("sft.py", SFT, tmp_path, kills=10, seed=0)


def test_grpo_killed_at_ten_random_moments_ends_as_an_uninterrupted_run(tmp_path):
    grpo = ["--model", "tiny", "--num-train", "16", "--num-eval", "2", "--group-size", "4", "--prompts-per-step", "4",
            "--max-new-tokens", "6", "--overlong", "none", "--lr", "2e-3", "--max-steps", "8", "--save-every", "1",
            "--reward-model", tiny_reward_model(tmp_path / "rm")]  # fmt: skip
    check_kill_anywhere("grpo.py", grpo, tmp_path, kills=10, seed=1)


# ───────────── output directories and --resume's arguments ─────────────

SHORT = ["--model", "tiny", "--num-train", "16", "--num-eval", "2", "--batch-size", "4", "--lr", "1e-3",
         "--max-new-tokens", "2", "--max-steps", "2", "--save-every", "1", "--keep-checkpoints"]  # fmt: skip


def test_resume_restores_the_runs_own_arguments_and_refuses_changes_that_alter_training(tmp_path):
    out = str(tmp_path / "run")
    assert run_script("sft.py", SHORT + ["--output-dir", out]).returncode == 0
    stored = json.load(open(os.path.join(out, "args.json")))
    r = run_script("sft.py", ["--output-dir", out])  # a fresh run into a used directory
    assert r.returncode != 0 and "is not empty: continue that run with --resume" in r.stderr
    r = run_script("sft.py", ["--output-dir", out, "--resume", "--lr", "1e-2"])
    assert r.returncode != 0 and "--lr 0.001 -> 0.01" in r.stderr
    r = run_script("sft.py", ["--resume"])
    assert r.returncode != 0 and "--resume needs --output-dir" in r.stderr
    # no flag repeated: the run continues as it was started (model "tiny", not the default model)
    r = run_script("sft.py", ["--output-dir", out, "--resume", "--eval-every", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming with eval_every=1 (was 0)" in r.stdout
    assert json.load(open(os.path.join(out, "args.json"))) == {**stored, "resume": True, "eval_every": 1}
    r = run_script("sft.py", SHORT + ["--output-dir", out, "--overwrite"])
    assert r.returncode == 0 and [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]


def test_resume_of_a_directory_without_a_run_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_script("sft.py", SHORT + ["--output-dir", str(tmp_path / "empty"), "--resume"])
    assert r.returncode != 0 and "no run to continue" in r.stderr


# ───────────── caches keyed by content ─────────────


def test_the_dpo_reference_cache_is_recomputed_when_the_reference_weights_change(tmp_path, chatml, capsys):
    rows = [{"prompt": "p", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "a", "rejected": "bb"}]
    pairs = dpo.tokenize_pairs(rows, chatml, 200)[0]
    args = dpo.Args(model="tiny")
    cpu = torch.device("cpu")
    model = lambda seed: common.prepare_model(common.tiny_model(chatml, seed=seed))  # noqa: E731
    first = dpo.cached_reference_logps(model(0), pairs, "train", args, str(tmp_path), 0, 1, cpu)
    again = dpo.cached_reference_logps(model(0), pairs, "train", args, str(tmp_path), 0, 1, cpu)
    other = dpo.cached_reference_logps(model(1), pairs, "train", args, str(tmp_path), 0, 1, cpu)
    said = capsys.readouterr().out
    assert said.count("reference log-probs: computing") == 2 and said.count("reference log-probs: reusing") == 1
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_cached_generated_data_is_regenerated_for_another_key(tmp_path, capsys):
    calls = []

    def make(tag):
        calls.append(tag)
        return [{"text": tag}]

    path = str(tmp_path / "seqkd_data.jsonl")
    assert common.cached_jsonl(path, lambda: make("a"), 0, "key-a") == [{"text": "a"}]
    assert common.cached_jsonl(path, lambda: make("b"), 0, "key-a") == [{"text": "a"}]  # reused
    assert common.cached_jsonl(path, lambda: make("b"), 0, "key-b") == [{"text": "b"}]  # another teacher
    assert calls == ["a", "b"]


def test_rm_monte_carlo_labels_are_recomputed_for_another_policy_in_the_same_directory(tmp_path, chatml, capsys):
    policy = tmp_path / "policy"
    rows = [{"prompt": "2+2?", "completions": ["2+2 is 4.", "The answer is 4."], "labels": [True, True], "answer": 4}]
    args = rm.Args(model="tiny", kind="prm", policy=str(policy), mc_samples=2, max_new_tokens=3)
    out = tmp_path / "out"
    out.mkdir()
    for seed, expect in ((0, "computing"), (0, "reusing"), (1, "computing")):
        common.tiny_model(chatml, seed=seed).save_pretrained(policy)
        chatml.save_pretrained(policy)
        rm.mc_labelled(rows, args, 0, 1, torch.device("cpu"), str(out))
        assert f"Monte Carlo step labels: {expect}" in capsys.readouterr().out


# ───────────── distributed faults ─────────────

NAN_ON_ONE_RANK = """
import sys, time
sys.path.insert(0, {root!r})
import torch, common
rank, world, device = common.init_distributed()
try:
    common.check_finite(torch.tensor(float("nan") if rank == 1 else 0.7), "the loss", 3)
    common.all_reduce_sum(torch.ones(1))  # the gradient all-reduce a healthy rank goes on to
    print(f"rank {{rank}} went on", flush=True)
except FloatingPointError as e:
    print(f"rank {{rank}} stopped: {{e}}", flush=True)
"""


def test_a_nan_on_one_rank_stops_both_gloo_ranks_within_seconds(tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_ONE_RANK.format(root=ROOT))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                       env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0 stopped: step 3: the loss is not finite on 1 rank(s) (0.699999988079071 on this rank)" in r.stdout
    assert "rank 1 stopped: step 3: the loss is not finite on 1 rank(s) (nan on this rank)" in r.stdout
    assert time.time() - t0 < 60


# ───────────── bad input names file, line and field ─────────────


@pytest.mark.parametrize("line,reader,message", [
    (b'{"prompt": "p", "chosen": "a", "rejected": "\xff"}', "read_preferences", r"x.jsonl:2: not valid UTF-8"),
    (b'{"prompt": 5, "completion": "a"}', "read_sft", r"x.jsonl:2: field 'prompt' has type int"),
    (b'{"prompt": "p", "completion": ["a"]}', "read_sft", r"x.jsonl:2: field 'messages', message 1: expected an object"),
    (b'{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}', "read_preferences",
     r"x.jsonl:2: field 'chosen', message 0: 'content' must be a string, is missing"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "read_preferences", r"x.jsonl:2: NaN is not a number"),
    (b'{"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "a"}]}', "read_sft",
     r"x.jsonl:2: field 'messages', message 0: unknown role 'usr'"),
    (b'{"prompt": "p", "answer": 7.9}', "read_prompts", r"x.jsonl:2: field 'answer' must be an integer, got 7.9"),
    (b'{"prompt": "p", "answer": "seven"}', "read_prompts", r"x.jsonl:2: field 'answer' must be an integer, got 'seven'"),
])  # fmt: skip
def test_bad_input_is_an_error_naming_file_line_and_field(tmp_path, line, reader, message):
    good = {"read_preferences": b'{"prompt": "p", "chosen": "a", "rejected": "b"}',
            "read_sft": b'{"prompt": "p", "completion": "a"}', "read_prompts": b'{"prompt": "p", "answer": "7"}'}[reader]  # fmt: skip
    path = tmp_path / "x.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n")
    with pytest.raises(common.DataError, match=message):
        getattr(common, reader)(str(path))


NO_SYSTEM = (  # Gemma's rule, as its chat template states it
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>assistant\n' }}{% endif %}"
)
SYSTEM = '[{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]'


@pytest.mark.parametrize("line,read", [
    (f'{{"messages": {SYSTEM[:-1]}, {{"role": "assistant", "content": "4"}}]}}',
     lambda path, tok: sft.load_samples(path, tok, 512, "drop", "train", 0, 0)),
    (f'{{"prompt": {SYSTEM}, "chosen": "4", "rejected": "5"}}',
     lambda path, tok: dpo.tokenize_pairs(common.read_preferences(path), tok, 512)),
    (f'{{"prompt": {SYSTEM}, "chosen": "4", "rejected": "5"}}',
     lambda path, tok: rm.tokenize_pairs(common.read_preferences(path), tok, 512)),
    (f'{{"prompt": {SYSTEM}, "completion": "4", "label": true}}',
     lambda path, tok: variants.tokenize_unpaired(variants.read_unpaired(path), tok, 512, 0)),
    (f'{{"prompt": {SYSTEM}, "answer": 4}}', lambda path, tok: common.read_prompts(path, tok)),
])  # fmt: skip
def test_a_sample_the_chat_template_refuses_is_an_error_naming_its_line_before_training(tmp_path, line, read):
    from conftest import byte_tokenizer

    tok = byte_tokenizer(["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", NO_SYSTEM)
    good = line.replace('{"role": "system", "content": "be brief"}, ', "")
    path = tmp_path / "x.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(common.DataError, match="x.jsonl:2: the chat template refuses this sample: System role not supported"):
        read(str(path), tok)


def test_an_integer_answer_given_as_a_string_is_read_as_that_integer(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "p", "answer": " -12 "}\n')
    assert common.read_prompts(str(path))[0]["answer"] == -12


def test_asking_the_builtin_task_for_more_problems_than_it_has_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match=f"has {common.builtin_size('test')} test problems; 100000 were asked for"):
        common.builtin_task("test", 100000)
    assert len(common.builtin_task("test", common.builtin_size("test"))) == common.builtin_size("test")
