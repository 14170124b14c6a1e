"""sft.py: the loss against its formula, gradient accumulation, packed vs per-document loss, a short
run that learns and saves a loadable model, 2 gloo processes vs 1, kill and --resume, bad data.

    python -m pytest tests/test_sft.py
"""

import json
import os
import pytest
import torch
from safetensors.torch import load_file

import common
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one
import sft



def test_sft_loss_matches_hand_computation():
    # token: −(−1 −2 −3)/3 = 2;  sequence: row means 1.5 and 3 → 2.25
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert sft.sft_loss(logp, mask, "token").item() == pytest.approx(2.0)
    assert sft.sft_loss(logp, mask, "sequence").item() == pytest.approx(2.25)


def test_sft_loss_matches_float64_brute_force_with_packed_documents():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1, 40, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(1, 40, generator=g) > 0.3
    doc = torch.tensor([[0] * 10 + [1] * 5 + [2] * 25])
    tok = -sum(logp[0, t] for t in range(40) if mask[0, t]) / sum(mask[0])
    per_doc = []
    for d in range(3):
        ts = [t for t in range(40) if doc[0, t] == d and mask[0, t]]
        per_doc.append(-sum(logp[0, t] for t in ts) / len(ts))
    assert sft.sft_loss(logp, mask, "token").item() == pytest.approx(tok.item(), abs=1e-12)
    assert sft.sft_loss(logp, mask, "sequence", doc).item() == pytest.approx(sum(per_doc).item() / 3, abs=1e-12)


def test_sft_loss_ignores_fully_masked_rows_instead_of_nan():
    logp = torch.tensor([[-1.0, -3.0], [-5.0, -5.0]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    assert sft.sft_loss(logp, mask, "sequence").item() == pytest.approx(2.0)
    assert sft.sft_loss(logp, mask, "token").item() == pytest.approx(2.0)


def _train_samples(tok, n=4):
    return [common.tokenize_conversation(tok, c) for c in common.builtin_sft("train", n)]


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_four_micro_batches_of_one_equal_one_batch_of_four(tiny, chatml, normalize):
    samples = _train_samples(chatml)

    def step_grads(max_tokens):
        tiny.zero_grad()
        batches = sft.micro_batches(samples, max_tokens, True, chatml.pad_token_id)
        n = sum(sft.units(b, normalize) for b in batches)
        total = 0.0
        for b in batches:
            logp, _ = common.token_logps(tiny, b)
            loss = sft.sft_loss(logp, b["labels"] != -100, normalize, common.doc_ids(b), n)
            loss.backward()
            total += loss.item()
        return len(batches), total, {k: p.grad.clone() for k, p in tiny.named_parameters()}

    n1, loss1, g1 = step_grads(4096)
    n4, loss4, g4 = step_grads(max(len(s["input_ids"]) for s in samples))
    assert (n1, n4) == (1, 4)
    assert loss4 == pytest.approx(loss1, abs=1e-5)
    for k in g1:
        torch.testing.assert_close(g4[k], g1[k], atol=1e-6, rtol=1e-4)


def test_packed_loss_equals_the_loss_of_each_document_alone(tiny, chatml):
    samples = _train_samples(chatml, 3)
    packed = common.collate_packed(samples)
    with torch.no_grad():
        logp, _ = common.token_logps(tiny, packed)
        loss = sft.sft_loss(logp, packed["labels"] != -100, "sequence", common.doc_ids(packed))
        alone = []
        for s in samples:
            b = common.collate_packed([s])
            lp, _ = common.token_logps(tiny, b)
            alone.append(sft.sft_loss(lp, b["labels"] != -100, "token"))
    assert loss.item() == pytest.approx(torch.stack(alone).mean().item(), abs=1e-5)


def test_padded_micro_batches_give_the_packed_loss(tiny, chatml):
    samples = _train_samples(chatml, 3)
    losses = []
    for packing in (True, False):
        (b,) = sft.micro_batches(samples, 4096, packing, chatml.pad_token_id)
        with torch.no_grad():
            logp, _ = common.token_logps(tiny, b)
        losses.append(sft.sft_loss(logp, b["labels"] != -100, "token").item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def tiny_args(tmp_path, **kw):
    base = dict(model="tiny", num_train=64, num_eval=8, max_steps=8, batch_size=8, lr=3e-3, warmup_steps=1,
                max_new_tokens=4, save_every=0, output_dir=str(tmp_path / "run"))  # fmt: skip
    return sft.Args(**{**base, **kw})


def test_short_run_lowers_held_out_loss_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sft.main(tiny_args(tmp_path))
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3
    assert train[-1] < train[0]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no cleanpost registration
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    init = common.tiny_model(tok, seed=0).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.allclose(v, init[k])]
    assert len(changed) == len(init)
    assert json.load(open(os.path.join(out, "args.json")))["lr"] == 3e-3


def test_sequence_normalization_and_no_packing_also_learn(tmp_path):
    out = sft.main(tiny_args(tmp_path, loss_normalization="sequence", packing=False, max_tokens=512))
    evals = [json.loads(l)["eval/loss"] for l in open(os.path.join(out, "metrics.jsonl")) if "eval/loss" in l]
    assert evals[1] < evals[0] - 0.3


def test_overlong_and_untrainable_samples_are_counted_not_trained(tmp_path, capsys):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 600}]},
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": "3+3?", "completion": "6"},
        {"messages": [{"role": "user", "content": "x" * 600}, {"role": "assistant", "content": "y"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft.main(tiny_args(tmp_path, data=str(path), max_tokens=256, max_steps=2, batch_size=2, overlong="truncate"))
    out = capsys.readouterr().out
    assert "3 training samples; 2 over 256 tokens (truncated), 1 without a trainable token (skipped)" in out


def test_bad_data_file_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+2?", "completion": "4"}\n{"prompt": "3+3?"}\n')
    with pytest.raises(common.DataError, match=r"d.jsonl:2: missing field 'messages'"):
        sft.main(tiny_args(tmp_path, data=str(path)))


# ───────────── processes: torchrun, kill and resume ─────────────

CLI = ["--model", "tiny", "--num-train", "64", "--num-eval", "4", "--batch-size", "8", "--lr", "3e-3",
       "--max-new-tokens", "2", "--warmup-steps", "1"]  # fmt: skip


def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path):
    check_two_processes_match_one("sft.py", CLI + ["--max-steps", "3", "--max-tokens", "400"], tmp_path, lr=3e-3)
    init = common.tiny_model(common.tiny_tokenizer()).state_dict()
    trained = load_file(os.path.join(tmp_path / "one", "model.safetensors"))
    assert not torch.allclose(trained["model.norm.weight"], init["model.norm.weight"])


def test_fsdp_two_processes_give_the_weights_of_one_unsharded_process(tmp_path):
    args = CLI + ["--max-steps", "3", "--max-tokens", "400", "--fsdp", "--save-every", "2", "--keep-checkpoints"]
    check_two_processes_match_one("sft.py", args, tmp_path, lr=3e-3)  # --fsdp shards only across processes
    assert os.path.exists(os.path.join(tmp_path / "two", "checkpoint-2", "model.safetensors"))  # gathered from the shards


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    check_resume_matches_uninterrupted("sft.py", CLI + ["--max-steps", "40", "--save-every", "5"], tmp_path, steps=40)
