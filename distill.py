"""Distillation from a teacher into a smaller student, and rejection-sampling fine-tuning.

    --mode seqkd      sequence-level KD (Kim & Rush 2016, arXiv:1606.07947): the teacher answers the
                      prompts (sampled; --teacher-temperature 0: greedy, as beam search), the student is fine-tuned on those
                      answers with the SFT loss:  L = −Σ_t log π_S(y_t | x, y_<t),  y = teacher(x)
    --mode rft        rejection-sampling fine-tuning (Yuan et al. 2023, arXiv:2308.01825): the student
                      samples N answers per prompt, a reward keeps the best one if it passes a threshold,
                      the student is fine-tuned on the kept answers; --rft-rounds times
    --mode token      token-level KD (Hinton et al. 2015, arXiv:1503.02531) on the data's answers: per
                      answer token, a divergence between the teacher's and the student's full next-token
                      distributions, L = mean_t D(p_T(·|x, y_<t), p_S(·|x, y_<t))
    --mode on-policy  on-policy distillation (GKD, Agarwal et al. 2024, arXiv:2306.13649): the student
                      samples the answers and the teacher scores every sampled prefix; the default
                      divergence is the reverse KL(p_S‖p_T), GKD with λ = 1 (--on-policy-frac < 1 mixes
                      in the data's own answers)
(Constitutional AI's critique-and-revision stage, self-distillation from revised answers, is cai.py.)

Divergences over the full vocabulary, at temperature τ (both distributions from logits / τ):
    forward  KL(p_T‖p_S) = Σ_v p_T (log p_T − log p_S)     mean-seeking: the student covers every mode
    reverse  KL(p_S‖p_T) = Σ_v p_S (log p_S − log p_T)     mode-seeking: it may drop modes (MiniLLM, arXiv:2306.08543)
    jsd      β KL(p_T‖m) + (1 − β) KL(p_S‖m),  m = β p_T + (1 − β) p_S   (GKD's generalized JSD; → β·forward
             as β → 0 and → (1 − β)·reverse as β → 1)
The logits of both models are formed chunk by chunk (--chunk answer tokens at a time, recomputed in
backward), so no (T, V) float32 tensor ever exists, let alone two.

The default student is the teacher with --student-layers of its layers kept (evenly spaced, first and
last included): it shares the tokenizer and runs offline. Any --student with the same vocabulary works.

    torchrun --nproc_per_node 2 distill.py --mode on-policy --teacher runs/sft-default
"""

import copy
import functools
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import common


@dataclass
class Args:
    """Distillation (sequence-level, token-level, on-policy) and rejection-sampling fine-tuning."""

    mode: Literal["seqkd", "rft", "token", "on-policy"] = "token"
    """what the student learns from: the teacher's answers, its own filtered answers, the teacher's
    distributions on the data's answers, or the teacher's distributions on its own samples"""
    # models and data
    teacher: str = common.DEFAULT_MODEL
    """the teacher; "tiny" for tests. A fine-tuned checkpoint (e.g. runs/sft-default) is the useful one"""
    student: str = ""
    """the student; empty: the teacher with --student-layers of its layers"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    student_layers: int = 10
    """layers of the teacher the default student keeps (SmolLM2-135M has 30)"""
    data: str = "builtin"
    """token / on-policy: SFT JSONL ("messages" or "prompt"/"completion"); seqkd / rft: prompts
    JSONL ({"prompt"}, plus "answer" for the rule reward); or "builtin" """
    num_train: int = 2000
    """built-in training samples"""
    num_eval: int = 64
    """held-out samples and problems of the built-in task (with your own data: see --eval-data)"""
    eval_data: str = ""
    """held-out JSONL for the held-out KL: prompts, or conversations ("messages", or "prompt" and "completion"); with
    your own --data and no --eval-data, the last --num-eval rows of --data are held out (and not trained on)"""
    # divergence
    divergence: Literal["auto", "forward", "reverse", "jsd"] = "auto"
    """token / on-policy loss; auto: forward for token (classic KD), reverse for on-policy (GKD)"""
    jsd_beta: float = 0.5
    """β of the generalized JSD, strictly between 0 and 1"""
    temperature: float = 1.0
    """τ of the divergence: both models' logits are divided by it"""
    tokens: Literal["answer", "all"] = "answer"
    """token: the tokens the divergence is summed over: the answers' (word-level KD), or every token of the
    conversation, the prompt's and the template's too, as when a pruned model is distilled back on whole text
    (Minitron, arXiv:2407.14679): the teacher's distributions there are far less certain than on the answers"""
    teacher_top_k: int = 0
    """forward KL on the teacher's k most likely tokens only (renormalised): what you would store when the
    teacher's outputs are precomputed offline, k numbers per token instead of V; 0: the full vocabulary"""
    chunk: int = 256
    """answer tokens whose (chunk, V) logits are formed at once"""
    # sampling
    on_policy_frac: float = 1.0
    """GKD's λ: the share of on-policy prompts answered by a fresh student sample (else the data's answer)"""
    sample_temperature: float = 1.0
    """temperature of the student's samples (on-policy, rft)"""
    max_new_tokens: int = 64
    """generation budget per answer"""
    teacher_temperature: float = 1.0
    """seqkd: the teacher samples its answers at this temperature, so the student fits the teacher's
    distribution; 0: greedy, the teacher's mode (Kim & Rush's beam search), which fits a sharper target
    and raises the student's KL to the full teacher distribution (seen on the tiny model)"""
    num_generate: int = 256
    """seqkd: prompts the teacher answers; rft: prompts per round the student samples for"""
    rft_samples: int = 4
    """rft: N answers per prompt"""
    rft_threshold: float = 1.0
    """rft: the best answer is kept only if its reward reaches this (1: the right answer)"""
    rft_rounds: int = 2
    """rft: sample-filter-train rounds; each gets max_steps / rft_rounds steps"""
    reward_model: str = ""
    """rft: score answers with this rm.py output instead of the rule reward"""
    format_reward: float = 0.1
    """rft rule reward: added when the answer uses the format "The answer is N" """
    # optimisation
    lr: float = 1e-4
    """peak AdamW learning rate"""
    batch_size: int = 8
    """samples per optimizer step, over all ranks"""
    max_steps: int = 40
    """optimizer steps"""
    warmup_steps: int = 4
    """linear warm-up steps before the cosine decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    max_tokens: int = 2048
    """tokens per packed micro-batch"""
    # run
    eval_every: int = 0
    """steps between evaluations; 0: only before and after training"""
    save_every: int = 20
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    fsdp: bool = False
    """shard the student's decoder layers across ranks (FSDP2); the teacher stays replicated"""
    output_dir: str = ""
    """where the student, args.json, metrics.jsonl and generated data go; default runs/distill-<mode>-<timestamp>"""
    seed: int = 0
    """seed for data order and sampling"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""


# ───────────── divergences ─────────────


def divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float = 1.0,
               beta: float = 0.5, top_k: int = 0) -> Tensor:  # fmt: skip
    """Per-token divergence (N,) between the next-token distributions of (N, V) logits, in float32 (or the
    input's float64). kind: "forward" KL(p_T‖p_S), "reverse" KL(p_S‖p_T), "jsd" (generalized, β).
    top_k > 0 (forward only): the teacher restricted to its k most likely tokens, renormalised."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    if top_k:
        if kind != "forward":
            raise common.UserError("--teacher-top-k needs the forward KL: the other divergences need the whole p_T")
        values, index = teacher_logits.to(dtype).topk(top_k, -1)
        lt = torch.log_softmax(values / temperature, -1)
        return (lt.exp() * (lt - ls.gather(-1, index))).sum(-1)
    lt = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise common.UserError(f"jsd needs 0 < β < 1, got {beta}")
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)  # log of the mixture m
        return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over valid tokens of KL(p_T‖p_S); logits (..., V), mask (...)."""
    return common.masked_mean(divergence(student_logits, teacher_logits, "forward", temperature), mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over valid tokens of KL(p_S‖p_T)."""
    return common.masked_mean(divergence(student_logits, teacher_logits, "reverse", temperature), mask)


def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Mean over valid tokens of the generalized JSD_β(p_T‖p_S)."""
    return common.masked_mean(divergence(student_logits, teacher_logits, "jsd", temperature, beta), mask)


def answer_divergence(student, teacher, batch: dict, kinds: tuple[str, ...], args: Args, top_k: int = 0) -> tuple[Tensor, int]:
    """Σ over the answer tokens of a batch of each per-token divergence in `kinds`, (len(kinds),), and their
        number; one forward of each model serves them all. top_k: see divergence (training only; the held-out
    KL is always over the full vocabulary). The two models' (chunk, V) logits are formed
        --chunk tokens at a time; under autograd each chunk is recomputed in backward instead of stored."""
    with torch.no_grad():
        ht = common.forward_hidden(teacher, batch)[:, :-1]  # position t predicts token t + 1
    hs = common.forward_hidden(student, batch)[:, :-1]
    at = batch["labels"][:, 1:] != common.IGNORE
    hs, ht = hs[at], ht[at]  # (N, H) each

    def chunk_sum(h_s, h_t):
        s_logits, t_logits = common.output_logits(student, h_s), common.output_logits(teacher, h_t)
        return torch.stack([divergence(s_logits, t_logits, k, args.temperature, args.jsd_beta, top_k).sum()
                            for k in kinds])  # fmt: skip

    total = hs.new_zeros(len(kinds), dtype=torch.float32)
    for i in range(0, hs.shape[0], args.chunk):
        part = (hs[i : i + args.chunk], ht[i : i + args.chunk])
        total = total + (checkpoint(chunk_sum, *part, use_reentrant=False) if torch.is_grad_enabled() else chunk_sum(*part))
    return total, int(at.sum())


# ───────────── models ─────────────


def layer_subset(teacher, n: int):
    """A copy of the teacher keeping n of its decoder layers, evenly spaced, first and last included."""
    layers = teacher.get_decoder().layers
    if n >= len(layers):
        raise common.UserError(f"--student-layers {n} keeps all {len(layers)} of the teacher's layers: the student would be "
                               f"the teacher (KL 0); pass --student-layers below {len(layers)}, or --student PATH")  # fmt: skip
    student = copy.deepcopy(teacher)
    layers = student.get_decoder().layers
    keep = sorted({round(i * (len(layers) - 1) / max(n - 1, 1)) for i in range(n)})
    student.get_decoder().layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(student.get_decoder().layers):
        layer.self_attn.layer_idx = new  # the KV cache is indexed by it
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def check_same_outputs(teacher, student) -> None:
    """The two models' logits must have the same width (a checkpoint may pad its embedding beyond the
    tokenizer, e.g. to a multiple of 64): say so at the start rather than fail at the first divergence."""
    t, s = (m.get_output_embeddings().weight.shape[0] for m in (teacher, student))
    if t != s:
        raise common.UserError(f"the student's output layer has {s} rows and the teacher's {t}: token-level distillation "
                         f"compares logits id by id, so resize one (model.resize_token_embeddings({t})) and save it")  # fmt: skip


# ───────────── data ─────────────


def shared_answers(
    model, tokenizer, prompts: list, temperature: float, tag: str, args: Args, rank: int, world: int
) -> list[dict]:
    """Seeded answers to all prompts as training samples with their text, in prompt order on every rank;
    each rank generates its share (prompt i's seed is (seed, tag, i), so the split changes nothing)."""
    mine = list(range(len(prompts)))[rank::world]
    gens = common.generate(model, tokenizer, [prompts[i] for i in mine], args.max_new_tokens, temperature=temperature,
                           seeds=[common.hash_int([args.seed, tag, i]) for i in mine])  # fmt: skip
    rows = common.all_gather_objects([{"i": i, **common.answer_sample(g), "text": g["text"]} for i, g in zip(mine, gens)])
    return sorted(rows, key=lambda r: r["i"])


def seqkd_data(teacher, tokenizer, prompts: list[dict], args: Args, rank: int, world: int) -> list[dict]:
    """The teacher's answers (seeded samples at --teacher-temperature) to the first --num-generate prompts."""
    return shared_answers(
        teacher, tokenizer, [p["prompt"] for p in prompts], args.teacher_temperature, "seqkd", args, rank, world
    )


def rft_data(student, tokenizer, prompts: list[dict], rnd: int, args: Args, reward_model, rank, world, device) -> list[dict]:
    """One rft round: N seeded samples per prompt from the current student, the best one kept if its
    reward reaches --rft-threshold."""
    mine = list(range(len(prompts)))[rank::world]
    n = args.rft_samples
    flat = [prompts[i] for i in mine for _ in range(n)]
    seeds = [common.hash_int([args.seed, rnd, i, j]) for i in mine for j in range(n)]
    gens = common.generate(student, tokenizer, [p["prompt"] for p in flat], args.max_new_tokens,
                           temperature=args.sample_temperature, seeds=seeds)  # fmt: skip
    rewards = common.answer_scores(flat, [g["text"] for g in gens], reward_model, device, args.format_reward, args.max_tokens).view(-1, n)
    rows = []
    for k, i in enumerate(mine):
        best = int(rewards[k].argmax())
        row = {"i": i, "reward": float(rewards[k, best]), "text": gens[k * n + best]["text"]}
        rows.append({**row, **common.answer_sample(gens[k * n + best])} if row["reward"] >= args.rft_threshold else row)
    return sorted(common.all_gather_objects(rows), key=lambda r: r["i"])


def on_policy_samples(student, tokenizer, convs: list[list[dict]], idx: list[int], step: int, args: Args) -> list[dict]:
    """This step's samples: for a share --on-policy-frac of the prompts (chosen by a hash, so the same on
    any number of ranks) a fresh seeded student answer, else the data's own answer."""

    def fresh(i):
        return random.Random(common.hash_int([args.seed, step, i, "λ"])).random() < args.on_policy_frac

    sampled = [i for i in idx if fresh(i)]
    gens = common.generate(student, tokenizer, [convs[i][:-1] for i in sampled], args.max_new_tokens,
                           temperature=args.sample_temperature, seeds=[common.hash_int([args.seed, step, i]) for i in sampled])  # fmt: skip
    by_idx = dict(zip(sampled, gens))
    return [common.answer_sample(by_idx[i]) if i in by_idx else common.tokenize_conversation(tokenizer, convs[i]) for i in idx]


# ───────────── evaluation ─────────────


def eval_data(teacher, tokenizer, prompts: list, args: Args, rank: int, world: int) -> list[dict]:
    """The teacher's own sampled answers (τ = 1, seeded) to the held-out prompts: where the student should
    match it. Each rank answers its share."""
    return shared_answers(teacher, tokenizer, prompts, 1.0, "eval", args, rank, world)


def prompt_and_conversation(row: dict) -> tuple[list, list | None]:
    """A held-out row -> its prompt (messages before the last answer) and its whole conversation (None
    for a bare prompt)."""
    if "messages" in row:
        msgs = common.check_messages(row["messages"], row.get("_where", "builtin"))
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs
    if "prompt" not in row:
        raise common.DataError(f"{row['_where']}: missing field 'messages' or 'prompt'")
    conv = common.as_messages(row["prompt"], row["completion"]) if "completion" in row else None
    return common.as_messages(row["prompt"]), conv


def held_out(args: Args, train_rows: list[dict]) -> tuple[list[dict], list[list], list[list]]:
    """(training rows, held-out prompts, held-out conversations). Built-in task: its test split. --eval-data:
    that file. Your own --data alone: its last --num-eval rows, kept out of training."""
    if args.eval_data:
        rows = common.read_jsonl(args.eval_data, {})
    elif args.data == "builtin":
        rows = [{"messages": c} for c in common.builtin_sft("test", args.num_eval, args.seed)]
    else:
        if len(train_rows) <= args.num_eval:
            raise common.UserError(f"{args.data} has {len(train_rows)} rows: too few to hold out --num-eval "
                                   f"{args.num_eval} of them; pass --eval-data or a smaller --num-eval")  # fmt: skip
        train_rows, rows = train_rows[: -args.num_eval], train_rows[-args.num_eval :]
    pairs = [prompt_and_conversation(r) for r in rows]
    return train_rows, [p for p, _ in pairs], [c for _, c in pairs if c is not None]


@torch.no_grad()
def held_out_kl(
    student, teacher, samples: list[dict], kinds: tuple[str, ...], args: Args, rank: int, world: int, device
) -> list[float]:
    """Each divergence in `kinds` per answer token, over every rank's share of the samples."""
    sums = common.Sums(*kinds, "tokens")  # each divergence summed over answer tokens
    mine = samples[rank::world]
    bins = common.pack_bins([len(s["input_ids"]) for s in mine], args.max_tokens) if mine else []
    for b in common.progress(common.even_out(bins, student), "held-out KL"):
        if b is None:  # --fsdp: this rank is out of micro-batches
            common.stand_in(student, device)
            continue
        batch = common.to_device(common.collate_packed([mine[i] for i in b]), device)
        with common.autocast(device):
            total, n = answer_divergence(student, teacher, batch, kinds, args)
        sums.add(**dict(zip(kinds, total.tolist())), tokens=n)
    sums = sums.total()
    return [sums[k] / max(sums["tokens"], 1.0) for k in kinds]


def evaluate(student, teacher, tokenizer, teacher_samples, data_samples, problems, args: Args, rank, world, device) -> dict:
    """Teacher–student KL per answer token on the teacher's own answers to held-out prompts (kl_forward,
    kl_reverse) and on the held-out reference answers (kl_forward_data), and the student's greedy accuracy."""
    student.eval()
    fwd, rev = held_out_kl(student, teacher, teacher_samples, ("forward", "reverse"), args, rank, world, device)
    out = {"eval/kl_forward": fwd, "eval/kl_reverse": rev}
    if data_samples:  # held-out prompts without answers have no data KL
        out["eval/kl_forward_data"] = held_out_kl(student, teacher, data_samples, ("forward",), args, rank, world, device)[0]
    if problems:
        out["eval/accuracy"] = common.greedy_accuracy(student, tokenizer, problems, args.max_new_tokens, rank, world)
    student.train()
    return out


# ───────────── training ─────────────


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out_dir = common.start_run(args, f"distill-{args.mode}", rank)
    kind = args.divergence if args.divergence != "auto" else ("forward" if args.mode == "token" else "reverse")
    if args.tokens == "all" and args.mode != "token":
        raise common.UserError(f"--tokens all is for --mode token; {args.mode} trains on answers only")

    tokenizer = common.load_tokenizer(args.teacher)
    teacher = common.load_model(args.teacher, tokenizer, seed=args.seed, dropout=args.dropout).to(device).requires_grad_(False).eval()
    if args.student:
        common.check_same_vocab(tokenizer, common.load_tokenizer(args.student), "the student's tokenizer differs from the "
                                "teacher's ({sizes}): distillation needs the same vocabulary")  # fmt: skip
        student = common.load_model(args.student, tokenizer, seed=args.seed, dropout=args.dropout).to(device)
        check_same_outputs(teacher, student)
    else:
        student = layer_subset(teacher, args.student_layers).requires_grad_(True)
    student = common.shard_model(student, args.fsdp)
    student.train()
    reward_model = None
    if args.reward_model:
        reward_model = (common.load_reward_model(args.reward_model).to(device), common.load_tokenizer(args.reward_model))

    builtin = args.data == "builtin"
    uses_prompts = args.mode in ("seqkd", "rft")
    if uses_prompts:
        prompts = common.builtin_prompts("train", args.num_train, args.seed) if builtin else common.read_prompts(args.data, tokenizer)
        prompts, eval_prompts, eval_convs = held_out(args, prompts)
        prompts = prompts[: args.num_generate] if args.mode == "seqkd" else prompts
        if args.mode == "rft" and reward_model is None and not all("answer" in p for p in prompts):
            missing = next(p for p in prompts if "answer" not in p)
            raise common.DataError(
                f"{missing['_where']}: missing field 'answer' (the rft rule reward needs it; or pass --reward-model)"
            )
    else:
        rows = ([{"messages": c} for c in common.builtin_sft("train", args.num_train, args.seed)] if builtin
                else common.read_sft(args.data))  # fmt: skip
        rows, eval_prompts, eval_convs = held_out(args, rows)
        convs = [r["messages"] for r in rows]
        samples = [common.tokenize_conversation(tokenizer, r["messages"], where=r.get("_where")) for r in rows]
        if args.tokens == "all":  # every token has a target, the first excepted (nothing predicts it)
            samples = [s | {"labels": [common.IGNORE, *s["input_ids"][1:]]} for s in samples]
        samples, overlong, untrainable = common.fit_length(samples, args.max_tokens, "drop")
        if rank == 0 and (overlong or untrainable):
            print(f"skipped {overlong} samples over {args.max_tokens} tokens and {untrainable} without an answer token")
        if not samples:
            raise common.UserError(f"{args.data}: no trainable samples left")
    data_samples = [common.tokenize_conversation(tokenizer, c) for c in eval_convs]
    # what generated data depends on: the teacher's weights (not its path), the prompts, the arguments
    data_key = common.cache_key(common.weights_fingerprint(teacher), prompts if uses_prompts else samples, eval_prompts,
                                common.training_args(args))  # fmt: skip
    make_eval = functools.partial(eval_data, teacher, tokenizer, eval_prompts, args, rank, world)
    teacher_samples = common.cached_jsonl(os.path.join(out_dir, "eval_data.jsonl"), make_eval, rank, data_key)
    problems = common.builtin_task("test", args.num_eval, args.seed) if builtin else []

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=not common.sharded(student))
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps, args.max_steps)
    start = common.load_checkpoint(out_dir, student, optimizer, scheduler)[0] if args.resume else 0

    train = None
    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("loss",))
    evaluate_now = functools.partial(evaluate, student, teacher, tokenizer, teacher_samples, data_samples, problems, args,
                                     rank, world, device)  # fmt: skip
    if start == 0:
        teacher_acc = common.greedy_accuracy(teacher, tokenizer, problems, args.max_new_tokens, rank, world) if problems else None
        log.log(0, evaluate_now() | ({"teacher/accuracy": teacher_acc} if problems else {}))
    if args.mode == "seqkd":
        train = common.cached_jsonl(os.path.join(out_dir, "seqkd_data.jsonl"),
                               lambda: seqkd_data(teacher, tokenizer, prompts, args, rank, world), rank, data_key)  # fmt: skip
    per_round = max(args.max_steps // args.rft_rounds, 1)
    for step in range(start, args.max_steps):
        t0, data_stats = time.time(), {}
        # 1. this step's samples
        if args.mode == "rft" and (train is None or step % per_round == 0):
            rnd = min(step // per_round, args.rft_rounds - 1)
            chosen = common.step_indices(len(prompts), args.num_generate, rnd, args.seed)
            pool = [prompts[i] for i in chosen]
            make = functools.partial(rft_data, student, tokenizer, pool, rnd, args, reward_model, rank, world, device)
            rows = common.cached_jsonl(os.path.join(out_dir, f"rft_round{rnd}.jsonl"), make, rank, data_key)
            train = [r for r in rows if "input_ids" in r]
            data_stats = {
                "rft/kept": len(train),
                "rft/prompts": len(rows),
                "rft/best_reward": sum(r["reward"] for r in rows) / len(rows),
            }
            if not train:
                print(f"rft round {rnd}: no answer reached --rft-threshold {args.rft_threshold}; the round trains on nothing")
        if args.mode in ("seqkd", "rft"):
            idx = common.step_indices(len(train), args.batch_size, step, args.seed) if train else []
            batch_samples = [train[i] for i in idx[rank::world]]
        elif args.mode == "token":
            idx = common.step_indices(len(samples), args.batch_size, step, args.seed)
            batch_samples = [samples[i] for i in idx[rank::world]]
        else:
            idx = common.step_indices(len(convs), args.batch_size, step, args.seed)
            batch_samples = on_policy_samples(student, tokenizer, convs, idx[rank::world], step, args)
        gen_s = time.time() - t0
        # 2. loss: mean over the step's answer tokens on all ranks
        batches = [batch for _, batch in common.packed_batches(batch_samples, args.max_tokens)]
        n_tok = float(
            common.all_reduce_sum(torch.tensor(float(sum(int((b["labels"] != common.IGNORE).sum()) for b in batches))))
        )
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in common.even_out(batches if n_tok else [], student):
            if batch is None:  # --fsdp: this rank is out of micro-batches
                common.stand_in(student, device, backward=True)
                continue
            batch = common.to_device(batch, device)
            with common.autocast(device):
                if args.mode in ("seqkd", "rft"):
                    logp, _ = common.token_logps(student, batch)
                    total = -(logp * (batch["labels"] != common.IGNORE)).sum()
                else:
                    total = answer_divergence(student, teacher, batch, (kind,), args, args.teacher_top_k)[0][0]
            loss = total / n_tok
            loss.backward()
            loss_sum += loss.detach().double().cpu()
        loss_sum = float(common.all_reduce_sum(loss_sum))
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {step}: loss is {loss_sum}; stopping before the update")
        metrics = {"loss": loss_sum, "answer_tokens": n_tok, **data_stats, "time/generation_s": gen_s}
        if n_tok:
            metrics["grad_norm"] = float(common.optimizer_step(student, optimizer, args.max_grad_norm, step))
        else:  # no answer token, no gradient: the step changes nothing (and the schedule follows an optimizer step)
            optimizer.step()
        scheduler.step()
        metrics |= {"lr": scheduler.get_last_lr()[0], "time/step_s": time.time() - t0}
        log.log(step + 1, metrics)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            log.log(step + 1, evaluate_now())
        if args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(out_dir, step + 1, student, optimizer, scheduler, rank)

    log.log(args.max_steps, evaluate_now())
    return common.finish_run(log, student, tokenizer, out_dir, rank, args.keep_checkpoints)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
