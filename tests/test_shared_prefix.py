"""Shared prefixes (common.collate_shared): one copy of the prompt for a preference pair or an RL group.
Every answer must get exactly the log-probs, entropies and gradients it gets in its own document
(common.collate_packed), on every family of the model zoo, and must not see its siblings.

    python -m pytest tests/test_shared_prefix.py
"""

import random

import pytest
import torch

import common
import zoo

IGNORE = common.IGNORE


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


def groups_of(vocab: int, prompt_lens: list[int], answer_lens: list[list[int]], seed: int = 0) -> list[list[dict]]:
    """Random groups: a prompt of each length (labels IGNORE) followed by answers of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for p, lens in zip(prompt_lens, answer_lens):
        prompt = rand(p)
        out.append([{"input_ids": prompt + a, "labels": [IGNORE] * p + a} for a in map(rand, lens)])
    return out


def per_answer(model, batch: dict, width: int = 16):
    """Each answer's token log-probs and entropies, (n, width), and the gradient of their sum."""
    model.zero_grad()
    logp, ent = common.token_logps(model, batch, entropy=True)
    mask = (batch["labels"] != IGNORE).float()
    ((logp * mask).sum() + 0.1 * (ent * mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return common.completion_matrix(logp, batch, width), common.completion_matrix(ent, batch, width), grads


# one row holding every shape: pairs, groups of 8, a prompt of 1 token with answers of 1 token
PROMPTS = [7, 5, 9, 6, 3, 1, 1]
ANSWERS = [[4, 6], [1, 3], [5, 5], [1, 2, 3, 4, 5, 6, 7, 8], [4] * 8, [1, 1], [1] * 8]


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_shared_prefix_log_probs_entropy_and_gradients_equal_one_document_per_answer(family, tok):
    model = common.prepare_model(zoo.tiny_family(family, tok))
    groups = groups_of(len(tok), PROMPTS, ANSWERS)
    flat = [s for g in groups for s in g]
    want_logp, want_ent, want_grad = per_answer(model, common.collate_packed(flat))
    batch = common.collate_shared(groups)
    # each group's prompt once: its length is saved once per answer beyond the first
    assert batch["input_ids"].shape[1] == len(common.collate_packed(flat)["input_ids"][0]) - sum(
        (len(g) - 1) * common.shared_prefix(g) for g in groups)
    logp, ent, grad = per_answer(model, batch)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    assert grad.keys() == want_grad.keys()
    for name in grad:
        torch.testing.assert_close(grad[name], want_grad[name], atol=1e-5, rtol=1e-4, msg=name)
    seq = common.sequence_logps(common.token_logps(model, batch)[0], batch)
    want = common.sequence_logps(common.token_logps(model, common.collate_packed(flat))[0], common.collate_packed(flat))
    torch.testing.assert_close(seq, want, atol=1e-5, rtol=0)


def test_a_sibling_cannot_influence_an_answer(tok):
    """Perturb one answer of a group: every other answer's log-probs are bit-identical."""
    model = common.prepare_model(zoo.tiny_family("llama", tok)).eval()
    groups = groups_of(len(tok), [6], [[5, 4, 6, 3]])
    changed = [[dict(s) for s in groups[0]]]
    changed[0][1] = {"input_ids": changed[0][1]["input_ids"][:6] + [4, 5, 6, 7], "labels": [IGNORE] * 6 + [4, 5, 6, 7]}
    with torch.no_grad():
        a = common.completion_matrix(common.token_logps(model, common.collate_shared(groups))[0], common.collate_shared(groups), 8)
        b = common.completion_matrix(common.token_logps(model, common.collate_shared(changed))[0], common.collate_shared(changed), 8)
    assert not torch.equal(a[1], b[1])
    for i in (0, 2, 3):
        assert torch.equal(a[i], b[i]), i


def test_the_shared_prefix_is_the_untrained_common_start_and_leaves_every_answer_a_token():
    s = lambda ids, n: {"input_ids": ids, "labels": [IGNORE] * n + ids[n:]}  # noqa: E731
    assert common.shared_prefix([s([1, 2, 3, 4], 2), s([1, 2, 3, 5], 2)]) == 2  # token 3 is trained: not shared
    assert common.shared_prefix([s([1, 2, 3, 4], 3), s([1, 2, 9, 5], 3)]) == 2  # the prompts differ at token 2
    assert common.shared_prefix([s([1, 2], 2), s([1, 2, 3], 2)]) == 1  # the shorter one keeps a token
    assert common.shared_prefix([s([7, 2], 1), s([1, 2], 1)]) == 0  # nothing in common: two documents
    batch = common.collate_shared([[s([7, 2], 1), s([1, 2], 1)], [s([1, 2, 3], 2), s([1, 2, 4], 2)]])
    assert batch["input_ids"].tolist() == [[7, 2, 1, 2, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2, 2]]
    assert batch["prev"].tolist() == [[-1, 0, -1, 2, -1, 4, 5, 5]]
    assert batch["doc"].tolist() == [[0, 0, 1, 1, 2, 2, 2, 3]]
    assert batch["segments"] == [(0, 2, 0, 0), (2, 4, 0, 0), (4, 6, 4, 4), (6, 7, 4, 6), (7, 8, 4, 6)]
    assert batch["ends"].tolist() == [1, 3, 6, 7]
    assert batch["cu_seqlens"].tolist() == [0, 4, 8]


def test_reward_model_last_token_of_each_shared_answer_equals_its_own_document(tok):
    model = common.prepare_model(zoo.tiny_family("llama", tok)).eval()
    groups = groups_of(len(tok), [5, 3], [[4, 2], [3, 6]])
    flat = [s for g in groups for s in g]
    with torch.no_grad():
        want = common.last_token_hidden(model, common.collate_packed(flat))
        got = common.last_token_hidden(model, common.collate_shared(groups))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_packed_batches_share_groups_by_prompt_and_split_a_group_too_long_for_a_row(tok):
    """RL samples in any order (some answers of a group filtered out, one empty): rows group them by
    prompt; each sample's answer log-probs equal the unshared rows'; a group over max_tokens is split."""
    model = common.prepare_model(zoo.tiny_family("llama", tok)).eval()
    groups = groups_of(len(tok), [5, 7, 3], [[3, 4, 2, 5], [2, 6], [4, 1, 1]])
    samples = [groups[0][0], groups[1][0], groups[0][2], groups[2][1], groups[0][3], groups[2][0], groups[1][1],
               {"input_ids": groups[2][2]["input_ids"][:3], "labels": [IGNORE] * 3}]  # fmt: skip
    want = torch.zeros(len(samples), 8)
    got = torch.zeros(len(samples), 8)
    with torch.no_grad():
        for idx, batch in common.packed_batches(samples, 4096):
            want[idx] = common.answer_logps(model, batch, 8)[0]
        rows = common.packed_batches(samples, 4096, share=True)
        assert len(rows) == 1 and sorted(i for idx, _ in rows for i in idx) == list(range(len(samples)))
        assert rows[0][1]["input_ids"].shape[1] == sum(len(s["input_ids"]) for s in samples) - 2 * 5 - 1 * 7 - 2 * 2
        for idx, batch in rows:
            got[idx] = common.answer_logps(model, batch, 8)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        rows = common.packed_batches(samples, 14, share=True)  # groups 0 (15 tokens shared) and 1 (15) must split
        assert max(b["input_ids"].shape[1] for _, b in rows) <= 14 and len(rows) >= 3
        assert sorted(i for idx, _ in rows for i in idx) == list(range(len(samples)))
        for idx, batch in rows:
            got[idx] = common.answer_logps(model, batch, 8)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_packed_batches_splits_a_group_where_its_shared_length_first_passes_max_tokens():
    """packed_batches keeps a running shared length (O(1) per sample); brute force: the greedy split that
    calls shared_length on each candidate part, over random groups that include answers with no token of
    their own (they shorten the shared prompt by one for the whole part)."""
    rng = random.Random(0)
    for _ in range(500):
        max_tokens, samples = rng.randint(8, 30), []
        for pid in range(rng.randint(1, 3)):
            p = rng.randint(1, 6)
            for _ in range(rng.randint(1, 7)):
                a = min(max_tokens - p, rng.choice([0, 0, 1, 2, 5, max_tokens]))
                samples.append({"input_ids": [100 + pid] + list(range(1, p)) + [7] * a, "labels": [IGNORE] * p + [7] * a})
        rng.shuffle(samples)
        parts = {}
        for i, s in enumerate(samples):  # by prompt, in order; a new part where the shared length would pass max_tokens
            prompt = tuple(s["input_ids"][: s["labels"].index(7)] if 7 in s["labels"] else s["input_ids"])
            chain = parts.setdefault(prompt, [[]])
            if chain[-1] and common.shared_length([samples[j] for j in chain[-1] + [i]]) > max_tokens:
                chain.append([])
            chain[-1].append(i)
        want = [part for chain in parts.values() for part in chain]
        rows = common.packed_batches(samples, max_tokens, share=True)
        got = [idx for idx, _ in rows]
        assert all(b["input_ids"].shape[1] <= max_tokens for _, b in rows)
        assert sorted(i for idx in got for i in idx) == list(range(len(samples)))
        assert sum(len(b["cu_seqlens"]) - 1 for _, b in rows) == len(want)  # as many groups as the brute force
        for part in want:  # each brute-force part is whole and in order inside one row
            row = next(idx for idx in got if part[0] in idx)
            k = row.index(part[0])
            assert row[k : k + len(part)] == part

# ───────────── the scripts: --share-prompt changes nothing but the tokens forwarded ─────────────

import dpo  # noqa: E402
import grpo  # noqa: E402
import rloo_remax  # noqa: E402
import rm  # noqa: E402
import variants  # noqa: E402
from helpers import assert_same_weights, read_metrics, tiny_reward_model  # noqa: E402

PAIRS = dict(model="tiny", num_train=24, num_eval=4, batch_size=8, lr=2e-3, warmup_steps=1, max_steps=2, save_every=0)
GROUPS = dict(model="tiny", num_train=8, num_eval=2, group_size=4, prompts_per_step=2, max_new_tokens=6, lr=2e-3,
              max_steps=2, save_every=0)  # fmt: skip
SCRIPTS = {
    "dpo": lambda out, share, _: dpo.main(dpo.Args(**PAIRS, max_new_tokens=2, rejected="data", share_prompt=share, output_dir=out)),
    "variants-ipo": lambda out, share, _: variants.main(variants.Args(**PAIRS, loss="ipo", max_new_tokens=2, share_prompt=share,
                                                                      output_dir=out)),
    "rm": lambda out, share, _: rm.main(rm.Args(**PAIRS, share_prompt=share, output_dir=out)),
    "grpo": lambda out, share, reward: grpo.main(grpo.Args(**GROUPS, overlong="none", mu=2, reward_model=reward,
                                                           share_prompt=share, output_dir=out)),
    "rloo": lambda out, share, reward: rloo_remax.main(rloo_remax.Args(**GROUPS, reward_model=reward, share_prompt=share,
                                                                       output_dir=out)),
}  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_sharing_the_prompt_gives_the_update_of_one_document_per_answer(script, tmp_path):
    reward = tiny_reward_model(tmp_path / "reward") if script in ("grpo", "rloo") else None
    outs = [str(tmp_path / f"share-{share}") for share in (True, False)]
    for out, share in zip(outs, (True, False)):
        SCRIPTS[script](out, share, reward)
    assert_same_weights(*outs, atol=0.05 * 2e-3, mean_atol=1e-7)
    losses = [[m["loss"] for m in read_metrics(out) if "loss" in m] for out in outs]
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)
