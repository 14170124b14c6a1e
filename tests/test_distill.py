"""distill.py: forward / reverse KL and the generalized JSD against exact sums over the vocabulary (zero
for equal distributions, asymmetry, temperature, masking, top-k), a bimodal teacher (the
reverse-KL student picks one mode, the forward-KL student covers both), the layer-subset student, each
mode lowering the held-out teacher–student KL on the tiny model, 2 gloo processes vs 1, kill and
--resume, and a student with another vocabulary refused. Constitutional AI (--mode cai): the critique
and revision templates, the constitution readers, the drop rules on hand-made revisions, and a run that
writes its chains and pairs, trains on them, and hands the pairs to dpo.py.

    python -m pytest tests/test_distill.py
"""

import math

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, check_two_processes_match_one, read_metrics

import common
import distill

# ───────────── divergences against exact sums ─────────────


def exact(p_logits, q_logits, kind, tau=1.0, beta=0.5):
    """Σ_v written out in float64 Python for one token; p: student, q: teacher."""
    def softmax(x):
        m = max(x)
        e = [math.exp((v - m) / tau) for v in x]
        return [v / sum(e) for v in e]

    s, t = softmax(p_logits), softmax(q_logits)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    if kind == "forward":
        return kl(t, s)
    if kind == "reverse":
        return kl(s, t)
    m = [beta * x + (1 - beta) * y for x, y in zip(t, s)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_divergences_match_exact_sums_and_ignore_masked_tokens(kind, tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, 11, generator=g, dtype=torch.float64) * 3, torch.randn(4, 3, 11, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(4, 3, generator=g) < 0.6
    mask[0, 0] = True
    fn = {"forward": distill.forward_kl, "reverse": distill.reverse_kl, "jsd": distill.jsd}[kind]
    got = fn(s, t, mask, temperature=tau)
    per = [exact(s[i, j].tolist(), t[i, j].tolist(), kind, tau) for i in range(4) for j in range(3) if mask[i, j]]
    assert got.item() == pytest.approx(sum(per) / len(per), rel=1e-10)
    noisy = s.masked_fill(~mask[..., None], 50.0)  # what masked positions hold changes nothing
    assert fn(noisy, t, mask, temperature=tau).item() == pytest.approx(got.item(), rel=1e-12)
    assert fn(s, s, mask, temperature=tau).item() == pytest.approx(0.0, abs=1e-12)  # equal distributions


def test_forward_and_reverse_kl_differ_and_jsd_half_is_symmetric():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    m = torch.ones(6, dtype=torch.bool)
    assert distill.forward_kl(s, t, m).item() != pytest.approx(distill.reverse_kl(s, t, m).item(), rel=1e-3)
    assert distill.forward_kl(s, t, m).item() == pytest.approx(distill.reverse_kl(t, s, m).item(), rel=1e-12)
    assert distill.jsd(s, t, m).item() == pytest.approx(distill.jsd(t, s, m).item(), rel=1e-12)
    assert distill.jsd(s, t, m, beta=0.2).item() != pytest.approx(distill.jsd(t, s, m, beta=0.2).item(), rel=1e-3)
    assert 0 < distill.jsd(s, t, m).item() <= math.log(2)  # JSD is bounded by log 2
    # β → 0 (resp. 1) the generalized JSD over β (resp. 1 − β) tends to the forward (resp. reverse) KL
    eps = 1e-5
    assert distill.jsd(s, t, m, beta=eps).item() / eps == pytest.approx(distill.forward_kl(s, t, m).item(), rel=1e-3)
    assert distill.jsd(s, t, m, beta=1 - eps).item() / eps == pytest.approx(distill.reverse_kl(s, t, m).item(), rel=1e-3)


def test_top_k_forward_kl_renormalises_the_teacher_and_equals_the_full_kl_at_k_v():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    full = distill.divergence(s, t, "forward")
    torch.testing.assert_close(distill.divergence(s, t, "forward", top_k=7), full)
    top2 = distill.divergence(s, t, "forward", top_k=2)
    for i in range(5):
        v, idx = t[i].topk(2)
        pt = torch.softmax(v, 0)
        ls = torch.log_softmax(s[i], 0)[idx]
        assert top2[i].item() == pytest.approx((pt * (pt.log() - ls)).sum().item(), rel=1e-12)
    with pytest.raises(ValueError, match="forward KL"):
        distill.divergence(s, t, "reverse", top_k=2)


def test_bimodal_teacher_reverse_kl_picks_a_mode_forward_kl_covers_both():
    """The mode-seeking picture MiniLLM (arXiv:2306.08543) draws for the reverse KL: a two-peaked teacher on a grid, a one-peaked student (a discretised Gaussian with a
    learnable mean and width). Minimising the reverse KL puts the student on one peak; minimising the
    forward KL spreads it over both."""
    x = torch.linspace(-6, 6, 121, dtype=torch.float64)
    teacher = torch.logsumexp(torch.stack([-((x - 3) ** 2) / 0.5, -((x + 3) ** 2) / 0.5]), 0)  # peaks at ±3
    left, right = x < 0, x > 0

    def fit(fn):
        # both start from the same point, a narrow student between the peaks, a little to the right
        mu = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        log_sigma = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([mu, log_sigma], lr=0.02)
        for _ in range(800):
            student = -((x - mu) ** 2) / (2 * torch.exp(2 * log_sigma))
            loss = fn(student[None], teacher[None], torch.ones(1, dtype=torch.bool))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.softmax(-((x - mu) ** 2) / (2 * torch.exp(2 * log_sigma)), 0).detach(), mu.item(), loss.item()

    q_rev, mu_rev, kl_rev = fit(distill.reverse_kl)
    assert mu_rev == pytest.approx(3.0, abs=0.05) and q_rev[right].sum() > 0.99  # one mode, the nearer one
    assert kl_rev == pytest.approx(math.log(2), abs=1e-3)  # exactly one of the two halves of the teacher
    q_fwd, mu_fwd, _ = fit(distill.forward_kl)
    assert abs(mu_fwd) < 0.3 and q_fwd[left].sum() > 0.4 and q_fwd[right].sum() > 0.4  # mass on both sides


def test_layer_subset_keeps_first_and_last_layers_and_generates(chatml):
    teacher = common.tiny_model(chatml, layers=4)
    student = distill.layer_subset(teacher, 2)
    layers = teacher.get_decoder().layers
    kept = student.get_decoder().layers
    assert len(kept) == 2 and student.config.num_hidden_layers == 2
    assert torch.equal(kept[0].mlp.up_proj.weight, layers[0].mlp.up_proj.weight)
    assert torch.equal(kept[1].mlp.up_proj.weight, layers[3].mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in kept] == [0, 1]
    assert len(teacher.get_decoder().layers) == 4  # the teacher is untouched
    common.generate(student, chatml, ["hi"], 4, temperature=1.0)  # the KV cache indexes the kept layers


def test_on_policy_frac_mixes_fresh_samples_with_the_data_answers_the_same_on_any_split(chatml):
    model = common.tiny_model(chatml).eval()
    convs = common.builtin_sft("train", 40, 0)
    data = [common.tokenize_conversation(chatml, c) for c in convs]

    def fresh(frac, idx):
        args = distill.Args(on_policy_frac=frac, max_new_tokens=4)
        return [s != data[i] for i, s in zip(idx, distill.on_policy_samples(model, chatml, convs, idx, 3, args))]

    everything = list(range(40))
    assert not any(fresh(0.0, everything))
    assert all(fresh(1.0, everything))
    half = fresh(0.5, everything)
    assert 10 <= sum(half) <= 30  # about half, drawn per (step, prompt)
    assert fresh(0.5, everything[1::2]) == half[1::2]  # a rank's share draws what the whole batch drew


# ───────────── each mode on the tiny model ─────────────


@pytest.fixture
def teacher(tuned_tiny):
    """The tiny model fine-tuned on the built-in task (conftest): peaked distributions worth distilling."""
    return tuned_tiny


def tiny_args(tmp_path, teacher, **kw):
    base = {"teacher": teacher, "student_layers": 1, "num_train": 64, "num_eval": 8, "batch_size": 8, "max_new_tokens": 12,
            "num_generate": 32, "lr": 3e-3, "warmup_steps": 1, "max_steps": 12, "save_every": 0,
            "output_dir": str(tmp_path / "run")}  # fmt: skip
    return distill.Args(**{**base, **kw})


@pytest.mark.parametrize("mode", ["token", "on-policy", "seqkd"])
def test_each_mode_lowers_the_held_out_teacher_student_kl(tmp_path, teacher, mode):
    rows = read_metrics(distill.main(tiny_args(tmp_path, teacher, mode=mode)))
    before, after = rows[0], rows[-1]
    assert after["eval/kl_forward"] < 0.8 * before["eval/kl_forward"], (before, after)
    assert after["eval/kl_reverse"] < 0.8 * before["eval/kl_reverse"], (before, after)
    assert "teacher/accuracy" in before


def test_tokens_all_fits_the_teacher_on_the_prompts_which_answer_only_kd_leaves_alone(tmp_path, teacher):
    tok = common.load_tokenizer(teacher)
    held = [common.tokenize_conversation(tok, c) for c in common.builtin_sft("test", 8)]
    prompts_only = common.collate_packed([h | {"labels": [t if l == common.IGNORE else common.IGNORE for t, l in
                                                          zip(h["input_ids"], h["labels"])]} for h in held])  # fmt: skip
    prompts_only["labels"][:, 0] = common.IGNORE
    t_model = common.load_model(teacher, tok).eval()

    def prompt_kl(student_dir):
        with torch.no_grad():
            total, n = distill.answer_divergence(common.load_model(student_dir, tok).eval(), t_model, prompts_only, ("forward",),
                                                 tiny_args(tmp_path, teacher))  # fmt: skip
        return float(total[0]) / n

    answer = distill.main(tiny_args(tmp_path, teacher, mode="token", output_dir=str(tmp_path / "answer")))
    every = distill.main(tiny_args(tmp_path, teacher, mode="token", tokens="all", output_dir=str(tmp_path / "all")))
    assert prompt_kl(every) < 0.5 * prompt_kl(answer)
    rows = read_metrics(every)  # and on the answers it still distils
    assert rows[-1]["eval/kl_forward"] < 0.8 * rows[0]["eval/kl_forward"]
    with pytest.raises(common.UserError, match="--tokens all is for --mode token"):
        distill.main(tiny_args(tmp_path, teacher, mode="on-policy", tokens="all", output_dir=str(tmp_path / "x")))


def test_rft_keeps_the_best_answers_and_lowers_the_kl(tmp_path, teacher, monkeypatch):
    """rft with a reward that prefers what the teacher would say (its mean log-prob of the answer): the
    kept answers are the teacher-like ones, so fine-tuning on them moves the student towards the teacher."""
    tok = common.load_tokenizer(teacher)
    judge = common.load_model(teacher, tok).eval()

    def teacher_likes(prompts, texts, *a, **k):
        docs = [common.tokenize_conversation(tok, common.as_messages(p["prompt"], t)) for p, t in zip(prompts, texts)]
        batch = common.collate_packed(docs)
        with torch.no_grad():
            logp, _ = common.token_logps(judge, batch)
        mask = (batch["labels"] != common.IGNORE).float()
        doc = common.doc_ids(batch)[0]
        return torch.zeros(len(docs)).index_add(0, doc, (logp * mask)[0]) / torch.zeros(len(docs)).index_add(0, doc, mask[0])

    monkeypatch.setattr(common, "answer_scores", teacher_likes)
    args = tiny_args(tmp_path, teacher, mode="rft", rft_samples=4, rft_threshold=-1e9, rft_rounds=2)
    rows = read_metrics(distill.main(args))
    rounds = [r for r in rows if "rft/kept" in r]
    assert [r["rft/kept"] for r in rounds] == [32, 32]  # every prompt keeps its best answer (threshold off)
    assert rows[-1]["eval/kl_forward"] < 0.8 * rows[0]["eval/kl_forward"]
    kept = [__import__("json").loads(line) for line in open(tmp_path / "run" / "rft_round0.jsonl")]
    assert len(kept) == 32 and all("input_ids" in r for r in kept)


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_rft_threshold_drops_answers_and_says_so(tmp_path, teacher):
    # the tiny student never gets the arithmetic right: with the default threshold nothing is kept, and the
    # steps without an answer token still tick the schedule without torch's scheduler-before-optimizer warning
    rows = read_metrics(distill.main(tiny_args(tmp_path, teacher, mode="rft", max_steps=2, rft_rounds=1)))
    assert [r["rft/kept"] for r in rows if "rft/kept" in r] == [0]
    assert all(r["answer_tokens"] == 0 and "grad_norm" not in r for r in rows if "loss" in r)


def test_a_student_with_another_vocabulary_is_refused(tmp_path, teacher, llama3):
    other = tmp_path / "other"
    common.tiny_model(llama3).save_pretrained(other)
    llama3.save_pretrained(other)
    with pytest.raises(ValueError, match="the student's tokenizer differs from the teacher's"):
        distill.main(tiny_args(tmp_path, teacher, student=str(other)))


def test_a_student_whose_embedding_is_padded_beyond_the_tokenizer_is_refused_at_the_start(tmp_path, teacher):
    """Same tokenizer, 64 more output rows (as checkpoints padded to a multiple of 64 have): a clear error
    before any data is generated or step taken, instead of a shape error at the first evaluation."""
    padded = tmp_path / "padded"
    tok = common.load_tokenizer(teacher)
    model = common.load_model(teacher, tok)
    model.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] + 64)
    model.save_pretrained(padded)
    tok.save_pretrained(padded)
    with pytest.raises(ValueError, match=r"the student's output layer has \d+ rows and the teacher's \d+"):
        distill.main(tiny_args(tmp_path, teacher, student=str(padded), mode="seqkd"))
    assert not (tmp_path / "run" / "seqkd_data.jsonl").exists()


# ───────────── processes: torchrun, kill and resume ─────────────


def cli(teacher, mode):
    return ["--teacher", teacher, "--student-layers", "1", "--mode", mode, "--num-train", "32", "--num-eval", "4",
            "--batch-size", "8", "--max-new-tokens", "8", "--num-generate", "16", "--lr", "2e-3"]  # fmt: skip


@pytest.mark.parametrize("mode,shard", [("on-policy", []), ("seqkd", ["--fsdp"])])
def test_two_gloo_processes_give_the_weights_of_one_process(tmp_path, teacher, mode, shard):
    """seqkd's two processes shard the student (FSDP2); on-policy's replicate it."""
    args = cli(teacher, mode) + ["--max-steps", "3", "--max-tokens", "200"] + shard
    check_two_processes_match_one("distill.py", args, tmp_path, lr=2e-3)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, teacher):
    args = cli(teacher, "on-policy") + ["--max-steps", "6", "--save-every", "3"]
    check_resume_matches_uninterrupted("distill.py", args, tmp_path, steps=6)
