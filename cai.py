"""Constitutional AI's supervised stage (Bai et al. 2022, arXiv:2212.08073, section 3): the model
critiques and revises its own answers against written principles, then is fine-tuned on the revisions.

 1. the model answers each of --num-generate prompts (y0, seeded samples at --sample-temperature)
 2. a critic (--critic; default the model itself) is shown the prompt and y0 and asked to critique y0
    against a principle drawn from --constitution, then to revise y0 given its critique; --revisions
    rounds, each on the last kept answer (the two requests: CRITIQUE_REQUEST and REVISION_REQUEST below)
 3. a revision is dropped, and its chain ends, when it is empty or refuses, or, when a reward exists (the
    rule on prompts with an answer, or --reward-model), when it scores below y0, states fewer worked steps
    ("a + b = c") than y0 or a false one ("18 - 8 = 5"), or, under the rule, leaves a wrong y0 wrong: the
    guard against revisions that lose the answer or the working, or grow ever more conservative
 4. the model is fine-tuned on (prompt, last kept revision) with the SFT loss
        L = −(1/|A|) Σ_{t∈A} log π(y_t | x, y_<t)     A: the revisions' tokens of the step, on all ranks
    for --max-steps, or fewer: at most --max-epochs passes over the kept revisions (when the guard keeps
    a handful, a fixed step count would train on each of them dozens of times)

Every chain (y0, each principle, critique and revision, rewards, why it stopped) goes to cai_data.jsonl
and the pairs (last kept revision chosen, y0 rejected) to cai_preferences.jsonl, for `dpo.py --data`
(RL-CAI offline; `dpo.py --online --judge` is its online form). Evaluation: greedy accuracy on held-out
problems and the KL from the starting model, per token on its own held-out answers.

    torchrun --nproc_per_node 2 cai.py --model runs/sft-default
"""

import copy
import functools
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass

import torch
import tyro

import common


@dataclass
class Args:
    """Constitutional AI, supervised stage: critique, revise, fine-tune on the revisions."""

    # models and data
    model: str = common.DEFAULT_MODEL
    """the model that answers and is fine-tuned; "tiny" for tests. A fine-tuned checkpoint (e.g. runs/sft-default)"""
    critic: str = ""
    """the model that critiques and revises (e.g. a larger one); empty: the model itself"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    data: str = "builtin"
    """prompts JSONL ({"prompt"}, plus "answer" for the rule reward), or "builtin" """
    num_train: int = 2000
    """built-in training prompts"""
    num_generate: int = 256
    """prompts answered, critiqued and revised"""
    num_eval: int = 64
    """held-out problems of the built-in task, and the held-out prompts the KL is measured on"""
    constitution: str = "builtin"
    """the principles, a text file (one per line) or JSONL ({"name"?, "principle"}); builtin:
    DEFAULT_CONSTITUTION below (helpful, correct, harmless, concise)"""
    revisions: int = 1
    """critique-revision rounds per answer (typically 1-3)"""
    reward_model: str = ""
    """score answers with this rm.py output instead of the rule reward"""
    format_reward: float = 0.1
    """rule reward: added when the answer uses the format "The answer is N" """
    sample_temperature: float = 1.0
    """temperature of the answers, critiques and revisions"""
    max_new_tokens: int = 64
    """generation budget per answer, critique and revision"""
    # optimisation
    lr: float = 1e-5
    """peak AdamW learning rate (the model learns from its own revised answers: the rate at which distill.py's
    self-RFT, the same kind of data, gains on the RL start; at 1e-4 two steps on a handful of rows collapsed the
    model's sampled answers)"""
    batch_size: int = 8
    """revisions per optimizer step, over all ranks"""
    max_steps: int = 40
    """optimizer steps, when enough revisions are kept (see --max-epochs)"""
    max_epochs: float = 2.0
    """passes over the kept revisions at most: training stops after ⌈max_epochs · kept / batch_size⌉
    steps when that is fewer than --max-steps (0 steps when nothing is kept)"""
    warmup_steps: int = 4
    """linear warm-up steps before the cosine decay (scaled down with the steps when --max-epochs cuts them)"""
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
    output_dir: str = ""
    """where the model, args.json, metrics.jsonl and the generated data go; default runs/cai-<timestamp>"""
    seed: int = 0
    """seed for data order and sampling"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""


# ───────────── critique and revision ─────────────

DEFAULT_CONSTITUTION = [
    {"name": "helpful", "principle": "The answer addresses exactly what was asked and gives the reader what they need."},
    {"name": "correct", "principle": "Every step of the working is right, and so is the final result."},
    {"name": "harmless", "principle": "The answer contains nothing harmful, unsafe, rude or misleading."},
    {"name": "concise", "principle": "The answer says what it must in as few words as it can, with no repetition."},
]

# The two requests the critic sees, after the prompt and the answer under review (a fresh conversation
# each round, so the context stays as short as one answer):
#   user: <prompt>   assistant: <answer>   user: CRITIQUE_REQUEST   assistant: <critique>
#   user: REVISION_REQUEST   assistant: <revision>
CRITIQUE_REQUEST = (
    "Critique your last answer against this principle: {principle} "
    "Point out specifically where the answer falls short of it, if anywhere."
)
REVISION_REQUEST = (
    "Rewrite your last answer so that it follows the principle: {principle} "
    "Use your critique, keep what was right, and reply with the rewritten answer only."
)
# A revision that declines to answer: the evasive collapse CAI aims to avoid ("harmless but non-evasive", arXiv:2212.08073).
REFUSAL = re.compile(r"\b(I can ?not|I can't|I won't|I'm sorry|I am sorry|I'm unable|I am unable|as an AI)\b", re.IGNORECASE)
# A worked step: "a + b = c" (any of + - * / × ÷). A revision that states fewer than the answer it revises has lost
# working, the collapse a weak self-critic produces on math ("The answer is 14. The answer is 14."): right or not, its
# final number then comes with nothing to learn the method from. A stated step must also hold ("18 - 8 = 5" does not).
WORKED_STEP = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/×÷])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


def read_constitution(path: str) -> list[dict]:
    """Principles as [{"name", "principle"}]: the built-in set, a JSONL file ({"principle", "name"?}) or
    a text file with one principle per line (its name: the line)."""
    if path == "builtin":
        return DEFAULT_CONSTITUTION
    if path.endswith(".jsonl"):
        rows = common.read_jsonl(path, {"principle": str})
        principles = [{"name": r.get("name", r["principle"]), "principle": r["principle"]} for r in rows]
    else:
        with open(path) as f:
            principles = [{"name": line.strip(), "principle": line.strip()} for line in f if line.strip()]
    if not principles:
        raise common.DataError(f"{path}: no principles")
    return principles


def critique_conversation(prompt, answer: str, principle: dict) -> list[dict]:
    """What the critic is asked, to critique `answer` to `prompt` against `principle`."""
    request = CRITIQUE_REQUEST.format(principle=principle["principle"])
    return common.as_messages(prompt, answer) + [{"role": "user", "content": request}]


def revision_conversation(prompt, answer: str, principle: dict, critique: str) -> list[dict]:
    """What the critic is asked, after its critique, to revise `answer`."""
    request = REVISION_REQUEST.format(principle=principle["principle"])
    return critique_conversation(prompt, answer, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": request},
    ]


def drop_reason(revision: str, reward: float | None, original_reward: float | None, original: str = "",
                original_right: bool | None = None) -> str | None:  # fmt: skip
    """Why a revision is not used: "empty", "refusal", or, when a reward exists, "reward" (its reward is
    below the original answer's), "working" (it states fewer worked steps than the original), "slip" (a
    worked step it states is false) or "unimproved" (the original is known wrong, original_right False,
    and the revision scores no better: still wrong, so nothing in it is worth learning); None when it
    is kept. Without a reward (prompts with no answer and no --reward-model) only the first two apply."""
    if not revision.strip():
        return "empty"
    if REFUSAL.search(revision):
        return "refusal"
    if reward is None or original_reward is None:
        return None
    if reward < original_reward:
        return "reward"
    if len(WORKED_STEP.findall(revision)) < len(WORKED_STEP.findall(original)):
        return "working"
    if any(not step_holds(m) for m in WORKED_STEP.finditer(revision)):
        return "slip"
    if original_right is False and reward <= original_reward:
        return "unimproved"
    return None


def step_holds(step: re.Match) -> bool:
    """Whether a worked step "a op b = c" (a WORKED_STEP match) is true arithmetic (to 1e-6; ÷ by 0 is false)."""
    a, op, b, c = step.groups()
    a, b, c = float(a), float(b), float(c)
    if op in "/÷":
        return b != 0 and abs(a / b - c) < 1e-6
    return abs({"+": a + b, "-": a - b, "*": a * b, "×": a * b}[op] - c) < 1e-6


def add_round(row: dict, principle: str, critique: str, revision: str, reward: float | None) -> None:
    """Record one critique-revision round of `row` ({"y0", "y0_reward", "y0_right", "final", "rounds", "dropped"}):
    a kept revision becomes the answer the next round revises; a dropped one ends the chain."""
    reason = drop_reason(revision, reward, row["y0_reward"], row["y0"], row["y0_right"])
    row["rounds"].append({"principle": principle, "critique": critique, "revision": revision, "reward": reward,
                          "dropped": reason})  # fmt: skip
    if reason:
        row["dropped"] = reason
    else:
        row["final"] = revision


def revised(row: dict) -> bool:
    """Whether the chain kept at least one revision: only those rows are trained on."""
    return any(r["dropped"] is None for r in row["rounds"])


def cai_stats(rows: list[dict]) -> dict:
    """Counts for the log: prompts, rows kept for training, preference pairs, and each kind of drop."""
    out = {"cai/prompts": len(rows), "cai/kept": sum(map(revised, rows)), "cai/pairs": len(preference_pairs(rows))}
    out |= {f"cai/dropped_{k}": sum(r["dropped"] == k for r in rows) for k in ("empty", "refusal", "reward", "working", "slip", "unimproved")}
    out["cai/unchanged"] = sum(revised(r) and r["final"] == r["y0"] for r in rows)
    return out


def preference_pairs(rows: list[dict]) -> list[dict]:
    """RL-CAI's offline pairs: the final revision chosen over the first answer (dpo.py's format)."""
    return [{"prompt": r["prompt"], "chosen": r["final"], "rejected": r["y0"]}
            for r in rows if revised(r) and r["final"] != r["y0"]]  # fmt: skip



def cai_data(model, tokenizer, critic, critic_tokenizer, prompts: list[dict], principles: list[dict], args: Args,
             reward_model, rank: int, world: int, device) -> list[dict]:  # fmt: skip
    """For each prompt: the model's seeded answer y0, then --revisions rounds in which the critic
    critiques the current answer against a principle (drawn by a hash of the prompt and round) and
    revises it. Rewards (the rule, or --reward-model) are None when the prompts carry no answer.
    Each rank works on its share; every rank returns all rows in prompt order."""
    mine = list(range(len(prompts)))[rank::world]
    with_reward = reward_model is not None or all("answer" in p for p in prompts)

    def sample(m, tok, chats, ids, tag):
        seeds = [common.hash_int([args.seed, tag, i]) for i in ids]
        gens = common.generate(m, tok, chats, args.max_new_tokens, temperature=args.sample_temperature, seeds=seeds)
        return [g["text"] for g in gens]

    def rewards(ids, texts):
        if not with_reward:
            return [None] * len(texts)
        return common.answer_scores([prompts[i] for i in ids], texts, reward_model, device, args.format_reward, args.max_tokens).tolist()

    y0 = sample(model, tokenizer, [prompts[i]["prompt"] for i in mine], mine, "cai-y0")
    # whether y0 is right is known under the rule only (a reward model's score has no "right")
    right = [common.rule_reward(y, prompts[i]["answer"]) >= 1 if with_reward and reward_model is None else None for i, y in zip(mine, y0)]
    rows = [{"i": i, "prompt": prompts[i]["prompt"], "y0": y, "y0_reward": r, "y0_right": ok, "final": y, "rounds": [], "dropped": None}
            for i, y, r, ok in zip(mine, y0, rewards(mine, y0), right)]  # fmt: skip
    for rnd in range(args.revisions):
        live = [r for r in rows if r["dropped"] is None]
        if not live:
            break
        ids = [r["i"] for r in live]
        picked = [random.Random(common.hash_int([args.seed, "principle", rnd, i])).choice(principles) for i in ids]
        chats = [critique_conversation(r["prompt"], r["final"], p) for r, p in zip(live, picked)]
        critiques = sample(critic, critic_tokenizer, chats, ids, f"cai-critique{rnd}")
        chats = [revision_conversation(r["prompt"], r["final"], p, c) for r, p, c in zip(live, picked, critiques)]
        revisions = sample(critic, critic_tokenizer, chats, ids, f"cai-revision{rnd}")
        for r, p, c, y, w in zip(live, picked, critiques, revisions, rewards(ids, revisions)):
            add_round(r, p["name"], c, y, w)
    return sorted(common.all_gather_objects(rows), key=lambda r: r["i"])


# ───────────── evaluation ─────────────


@torch.no_grad()
def kl_from_start(model, start, samples: list[dict], max_tokens: int, rank: int, world: int, device) -> dict:
    """KL(π_start ‖ π) per answer token on the starting model's own held-out answers: sampled from
    π_start, so k1 = log π_start − log π estimates it without bias, and so does k3 = r − 1 − log r
    (r = π / π_start), with lower variance and never below 0 (Schulman, "Approximating KL divergence", 2020)."""
    sums = common.Sums("k1", "k3", "tokens")
    for _, batch in common.packed_batches(samples[rank::world], max_tokens):
        batch = common.to_device(batch, device)
        with common.autocast(device):
            start_logp, logp = common.token_logps(start, batch)[0], common.token_logps(model, batch)[0]
        mask = batch["labels"] != common.IGNORE
        sums.add(k1=common.kl_k1(start_logp, logp)[mask], k3=common.kl_k3(start_logp, logp)[mask], tokens=mask.sum())
    t = sums.total()
    return {"eval/kl_k1": t["k1"] / max(t["tokens"], 1.0), "eval/kl_k3": t["k3"] / max(t["tokens"], 1.0)}


def evaluate(model, start, tokenizer, start_answers, problems, args: Args, rank, world, device) -> dict:
    model.eval()
    out = kl_from_start(model, start, start_answers, args.max_tokens, rank, world, device)
    if problems:
        out["eval/accuracy"] = common.greedy_accuracy(model, tokenizer, problems, args.max_new_tokens, rank, world)
    model.train()
    return out


def held_out_answers(start, tokenizer, prompts: list, args: Args, rank: int, world: int) -> list[dict]:
    """The starting model's seeded answers (τ = 1) to the held-out prompts, as samples, in prompt order on every rank."""
    mine = list(range(len(prompts)))[rank::world]
    gens = common.generate(start, tokenizer, [prompts[i] for i in mine], args.max_new_tokens, temperature=1.0,
                           seeds=[common.hash_int([args.seed, "eval", i]) for i in mine])  # fmt: skip
    rows = common.all_gather_objects([{"i": i, **common.answer_sample(g)} for i, g in zip(mine, gens)])
    return sorted(rows, key=lambda r: r["i"])


# ───────────── training ─────────────


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out_dir = common.start_run(args, "cai", rank)

    tokenizer = common.load_tokenizer(args.model)
    model = common.load_model(args.model, tokenizer, seed=args.seed, dropout=args.dropout).to(device).train()
    start = copy.deepcopy(model).requires_grad_(False).eval()  # the model before training, for the KL from it
    critic, critic_tok = model, tokenizer
    if args.critic:
        critic_tok = common.load_tokenizer(args.critic)
        critic = common.load_model(args.critic, critic_tok, seed=args.seed).to(device).requires_grad_(False)
    reward_model = None
    if args.reward_model:
        reward_model = (common.load_reward_model(args.reward_model).to(device), common.load_tokenizer(args.reward_model))
    builtin = args.data == "builtin"
    prompts = common.builtin_prompts("train", args.num_train, args.seed) if builtin else common.read_prompts(args.data, tokenizer)
    if builtin:
        problems = common.builtin_task("test", args.num_eval, args.seed)
        eval_prompts = [common.as_messages(p["prompt"]) for p in problems]
    else:  # your own prompts: the last --num-eval are held out
        if len(prompts) <= args.num_eval:
            raise common.UserError(f"{args.data} has {len(prompts)} prompts: too few to hold out --num-eval {args.num_eval}")
        eval_prompts = [common.as_messages(p["prompt"]) for p in prompts[-args.num_eval :]]
        prompts, problems = prompts[: -args.num_eval], []
    prompts = prompts[: args.num_generate]

    # 1-3. answers, critiques and revisions, cached under the model's weights, the prompts and the arguments
    key = common.cache_key(common.weights_fingerprint(start), prompts, eval_prompts, common.training_args(args))
    make = functools.partial(cai_data, model.eval(), tokenizer, critic.eval(), critic_tok, prompts,
                             read_constitution(args.constitution), args, reward_model, rank, world, device)  # fmt: skip
    rows = common.cached_jsonl(os.path.join(out_dir, "cai_data.jsonl"), make, rank, key)
    make = functools.partial(held_out_answers, start, tokenizer, eval_prompts, args, rank, world)
    start_answers = common.cached_jsonl(os.path.join(out_dir, "eval_data.jsonl"), make, rank, key)
    del critic
    model.train()
    train = [common.tokenize_conversation(tokenizer, common.as_messages(r["prompt"], r["final"])) for r in rows if revised(r)]
    train, overlong, _ = common.fit_length(train, args.max_tokens, "drop")
    stats = cai_stats(rows) | {"cai/overlong": overlong}
    steps = min(args.max_steps, math.ceil(args.max_epochs * len(train) / args.batch_size))
    if rank == 0:
        with open(os.path.join(out_dir, "cai_preferences.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in preference_pairs(rows))
        print("cai data: " + ", ".join(f"{k.removeprefix('cai/')} {v}" for k, v in stats.items()))
        if steps < args.max_steps:
            print(f"cai: {len(train)} of {len(rows)} revisions kept: {steps} steps (--max-epochs {args.max_epochs:g} over them) "
                  f"instead of --max-steps {args.max_steps}" + ("; the model is saved as it started" if not train else ""))  # fmt: skip

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps * steps // max(args.max_steps, 1), steps)
    first = common.load_checkpoint(out_dir, model, optimizer, scheduler)[0] if args.resume else 0
    log = common.MetricsLog(out_dir, steps, first, rank, keys=("loss",))
    evaluate_now = functools.partial(evaluate, model, start, tokenizer, start_answers, problems, args, rank, world, device)
    if first == 0:
        log.log(0, evaluate_now() | stats)
    for step in range(first, steps):
        t0 = time.time()
        # 4. the SFT loss on this step's revisions: a mean over the step's answer tokens on all ranks
        idx = common.step_indices(len(train), args.batch_size, step, args.seed)[rank::world]
        batches = [batch for _, batch in common.packed_batches([train[i] for i in idx], args.max_tokens)]
        n_tok = float(common.all_reduce_sum(torch.tensor(float(sum(int((b["labels"] != common.IGNORE).sum()) for b in batches)))))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            batch = common.to_device(batch, device)
            with common.autocast(device):
                logp, _ = common.token_logps(model, batch)
            loss = -(logp * (batch["labels"] != common.IGNORE)).sum() / n_tok
            loss.backward()
            loss_sum += loss.detach().double().cpu()
        loss_sum = common.all_reduce_sum(loss_sum)
        common.check_finite(loss_sum, "the loss", step)
        grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, step)
        scheduler.step()
        log.log(step + 1, {"loss": float(loss_sum), "answer_tokens": n_tok, "grad_norm": float(grad_norm),
                           "lr": scheduler.get_last_lr()[0], "time/step_s": time.time() - t0})  # fmt: skip
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            log.log(step + 1, evaluate_now())
        if args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(out_dir, step + 1, model, optimizer, scheduler, rank)

    if steps:  # with nothing trained the model is its start: the evaluation above stands
        log.log(steps, evaluate_now())
    return common.finish_run(log, model, tokenizer, out_dir, rank, args.keep_checkpoints)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
