"""The model zoo: tiny random models of the families users bring (tests/zoo.py), each checked against its
own transformers forward — packed log-probs and entropy, the sampler's distribution, stop tokens, dropout,
the fp32 output layer under bf16 autocast — and one training step of sft, dpo and grpo on each.

    python -m pytest tests/test_models.py
"""

import json
import math
import os

import pytest
import torch

import common
import dpo
import grpo
import sft
import zoo

DOCS = [17, 9, 23]  # lengths; the sliding windows of the zoo are 6 tokens


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


def own_forward(model, ids: list[int], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_t | x_<t) and the entropy of each prediction, (L − 1,) each, from the model's own forward
    on the document alone (eager attention, its own head and logit transforms)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double() / temperature
    finally:
        model.set_attn_implementation(common.ATTN_IMPL)
    logp = logits.log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def random_docs(vocab: int, lengths=DOCS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ───────────── log-probs and entropy ─────────────


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_packed_logps_and_entropy_equal_the_models_own_forward_on_each_document(family, tok):
    model = common.prepare_model(zoo.tiny_family(family, tok)).eval()
    docs = random_docs(len(tok))
    batch = common.collate_packed([{"input_ids": d, "labels": d} for d in docs])
    with torch.no_grad():
        logp, ent = common.token_logps(model, batch, entropy=True)
    cu = batch["cu_seqlens"].tolist()
    for d, a, b in zip(docs, cu[:-1], cu[1:]):
        want_logp, want_ent = own_forward(model, d)
        torch.testing.assert_close(logp[0, a + 1 : b].double(), want_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[0, a + 1 : b].double(), want_ent, atol=1e-5, rtol=0)


def test_a_model_whose_forward_does_what_the_packed_path_does_not_is_refused_at_load(tok):
    model = zoo.tiny_family("llama", tok)
    model.config.final_logit_softcapping = 2.0  # output_logits would cap, LlamaForCausalLM does not
    with pytest.raises(ValueError, match="not supported exactly, so it is refused"):
        common.prepare_model(model)


def test_logits_are_float32_under_bf16_autocast(tok):
    """A logit near 20 has a bf16 resolution of 0.125: the output layer must not run in bf16."""
    model = common.prepare_model(zoo.tiny_family("llama", tok)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # logits of tens of nats, as in a trained model
        hidden = torch.randn(64, 64)
        target = torch.randint(0, len(tok), (64,))
        want = torch.log_softmax(hidden.double() @ model.get_output_embeddings().weight.double().T, -1)
        want = want.gather(-1, target[:, None]).squeeze(-1)
        assert want.abs().max() > 20
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_fn = lambda h: common.output_logits(model, h)  # noqa: E731
            got, _ = common.hidden_logps(hidden, logits_fn, target)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


# ───────────── sampling and stopping ─────────────


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_the_sampler_draws_from_the_distribution_the_scorer_scores(family, tok, monkeypatch):
    """At τ = 0.7 with a generation_config full of processors (repetition penalty 1.5, no repeated
    bigram, a minimum length, top-k 3): every sampled token's log-prob and every step's entropy
    under the sampler equal token_logps(temperature=0.7) of the finished answer."""
    model = common.prepare_model(zoo.tiny_family(family, tok)).eval()
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens, gc.top_k = 1.5, 2, 6, 3
    seen = []
    real_call = common.RowSampler.__call__

    def spy(self, input_ids, scores):
        seen.append(torch.log_softmax(scores.double() / self.temperature, -1))  # (B, V) per step
        return real_call(self, input_ids, scores)

    monkeypatch.setattr(common.RowSampler, "__call__", spy)
    gens = common.generate(model, tok, ["hi", "say something long"], 8, temperature=0.7, seeds=[1, 2])
    assert gc.repetition_penalty == 1.5  # the model's own config is given back
    for row, g in enumerate(gens):
        ids = g["prompt_ids"] + g["completion_ids"]
        batch = common.collate_packed([{"input_ids": ids, "labels": ids}])
        with torch.no_grad():
            logp, ent = common.token_logps(model, batch, temperature=0.7, entropy=True)
        n = len(g["prompt_ids"])
        for j, t in enumerate(g["completion_ids"]):
            dist = seen[j][row]
            assert logp[0, n + j].item() == pytest.approx(dist[t].item(), abs=1e-5)
            assert ent[0, n + j].item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-5)


def force_token(model, token: int):
    """Make `token` the argmax of every prediction (a hook on the output layer)."""

    def hook(module, inputs, out):
        out = out.clone()
        out[..., token] += 1e4
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_generation_stops_at_every_stop_id_of_the_generation_config(family, tok):
    model = common.prepare_model(zoo.tiny_family(family, tok)).eval()
    extra = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("!")]
    model.generation_config.eos_token_id = [tok.eos_token_id] + extra  # e.g. Gemma's [<eos>, <end_of_turn>]
    for stop in extra + [tok.eos_token_id]:
        handle = force_token(model, stop)
        [g] = common.generate(model, tok, ["hi"], 6)
        handle.remove()
        assert g["completion_ids"] == [stop] and g["ended"]
    [g] = common.generate(model, tok, ["hi"], 6)
    assert g["ended"] == (g["completion_ids"][-1] in model.generation_config.eos_token_id)


def test_a_base_model_under_a_chatml_template_stops_at_the_end_of_turn(tok):
    """eos is <|endoftext|> (a base model's), the template ends turns with <|im_end|>: both stop."""
    base = common.tiny_tokenizer()
    base.eos_token = "<|endoftext|>"
    model = common.prepare_model(zoo.tiny_family("qwen2", base)).eval()
    im_end = base.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == base.eos_token_id != im_end
    assert im_end in common.stop_token_ids(model, base)
    handle = force_token(model, im_end)
    [g] = common.generate(model, base, ["hi"], 6)
    handle.remove()
    assert g["completion_ids"] == [im_end] and g["ended"] and g["text"] == ""


# ───────────── dropout ─────────────


@pytest.mark.parametrize("family", ["gpt2", "phi"])
def test_dropout_is_off_in_training_mode_unless_asked(family, tok):
    docs = random_docs(len(tok))
    batch = common.collate_packed([{"input_ids": d, "labels": d} for d in docs])
    model = common.prepare_model(zoo.tiny_family(family, tok)).train()
    with torch.no_grad():
        a, b = common.token_logps(model, batch)[0], common.token_logps(model, batch)[0]
        model.eval()
        c = common.token_logps(model, batch)[0]
    assert torch.equal(a, b) and torch.equal(a, c)
    assert model.config.resid_pdrop == 0.1  # the saved config keeps the model's own setting
    kept = common.prepare_model(zoo.tiny_family(family, tok), dropout=True).train()
    with torch.no_grad():
        assert not torch.equal(common.token_logps(kept, batch)[0], common.token_logps(kept, batch)[0])


# ───────────── one training step of sft, dpo and grpo on every family ─────────────


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for family in zoo.FAMILIES:
        path = str(root / family)
        zoo.tiny_family(family, tok).save_pretrained(path)
        tok.save_pretrained(path)
        out[family] = path
    return out


def first_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_one_step_of_sft_dpo_and_grpo_trains_every_family(family, saved_families, tmp_path):
    path = saved_families[family]
    small = dict(model=path, num_train=8, num_eval=2, max_new_tokens=3, save_every=0)
    out = sft.main(sft.Args(**small, max_steps=1, batch_size=4, output_dir=str(tmp_path / "sft")))
    assert math.isfinite([r for r in first_metrics(out) if "loss" in r][0]["loss"])
    out = dpo.main(dpo.Args(**small, max_steps=1, batch_size=4, rejected="data", output_dir=str(tmp_path / "dpo")))
    # the policy is its own reference at the first step, dropout is off: the loss is exactly log 2
    assert [r for r in first_metrics(out) if "loss" in r][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    out = grpo.main(grpo.Args(**small, max_steps=1, group_size=2, prompts_per_step=2, overlong="none",
                              output_dir=str(tmp_path / "grpo")))  # fmt: skip
    assert math.isfinite([r for r in first_metrics(out) if "loss" in r][0]["loss"])
