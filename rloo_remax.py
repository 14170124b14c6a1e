"""REINFORCE with a sampled baseline, no critic and no clipping (Williams 1992; the two baselines below):

RLOO (REINFORCE Leave-One-Out, Ahmadian et al. 2024, arXiv:2402.14740): G answers per prompt, and
answer i's baseline is the mean reward of the other G − 1:
    A_i = r_i − 1/(G−1) Σ_{j≠i} r_j
The baseline does not depend on answer i itself, so the gradient stays unbiased, and within a group
the advantages sum to zero.

ReMax (Li et al. 2024, arXiv:2310.10505): the baseline is the reward of one greedy decode of the prompt:
    A_i = r(y_i) − r(ŷ_greedy)

Both take the plain policy gradient of the whole answer (on-policy: one update per rollout, so no
ratio and nothing to clip):
    L = −(1/N) Σ_i A_i · log π(y_i | x)          log π(y|x) summed over the answer's tokens
With --beta > 0 the KL to the reference enters the reward (as InstructGPT puts it, arXiv:2203.02155 eq. 2), per answer as the
summed k1 of its tokens: r_i ← r_i − β Σ_t (log π(y_t|·) − log π_ref(y_t|·)).

    torchrun --nproc_per_node 2 rloo_remax.py --estimator rloo
"""

import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch import Tensor

import common


@dataclass
class Args:
    """Critic-free REINFORCE with a leave-one-out (RLOO) or greedy (ReMax) baseline."""

    # model and data
    model: str = common.DEFAULT_MODEL
    """policy to train, and the reference; "tiny" for tests"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    estimator: Literal["rloo", "remax"] = "rloo"
    """rloo: leave-one-out mean of the group; remax: the reward of a greedy decode"""
    data: str = "builtin"
    """JSONL of {"prompt", "answer"} for the rule reward (any prompt with --reward-model), or "builtin" """
    num_train: int = 2000
    """built-in training prompts"""
    num_eval: int = 64
    """built-in held-out problems for greedy accuracy"""
    reward_model: str = ""
    """score answers with this rm.py output instead of the rule reward"""
    format_reward: float = 0.1
    """rule reward: added when the answer uses the format "The answer is N", right or wrong"""
    # algorithm
    group_size: int = 8
    """G: answers sampled per prompt (RLOO needs ≥ 2; ReMax adds one greedy decode per prompt)"""
    prompts_per_step: int = 8
    """prompts per step, over all ranks (each rank samples whole groups); 8 × 15 steps: the validated runs
    (tests/validate.py rloo-8x15, remax-8x15: RLOO +10.9 and +9.8 over two seeds, ReMax +14.8)"""
    temperature: float = 1.0
    """sampling temperature; the training forward divides the logits by it too"""
    max_new_tokens: int = 64
    """generation budget per answer"""
    beta: float = 0.05
    """β of the k1 KL penalty in the reward; 0 loads no reference model"""
    # optimisation
    lr: float = 1e-5
    """peak AdamW learning rate (the validated runs, tests/validate.py rloo-8x15 / remax-8x15)"""
    max_steps: int = 15
    """steps (each: sample, score, one update)"""
    warmup_steps: int = 0
    """linear warm-up steps before the cosine decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    max_tokens: int = 4096
    """tokens per packed micro-batch of the update"""
    share_prompt: bool = True
    """a group's prompt once in the packed row, its answers attending to it (common.collate_shared): exact, fewer tokens"""
    # run
    eval_every: int = 10
    """steps between greedy evaluations (also before and after training); 0: only those"""
    save_every: int = 10
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    output_dir: str = ""
    """where the model, args.json and metrics.jsonl go; default runs/<estimator>-<timestamp>"""
    seed: int = 0
    """seed for prompt order and sampling"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state across ranks (FSDP2) instead of replicating"""


# ───────────── advantages and loss ─────────────


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """rewards (B,), the G = group_size answers of a prompt adjacent -> (B,):
    A_i = r_i − (Σ_g r − r_i)/(G − 1), the leave-one-out baseline (arXiv:2402.14740, eq. 4)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 answers per prompt")
    r = rewards.view(-1, group_size)  # (B,) -> (B/G, G)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    tied = (r == r[:, :1]).all(dim=1, keepdim=True)  # all-equal group: exactly 0, not the rounding of r − baseline
    return (r - baseline).masked_fill(tied, 0.0).view(-1)


def remax_advantages(sample_rewards: Tensor, greedy_rewards: Tensor) -> Tensor:
    """sample_rewards (B,), greedy_rewards (B,) — the greedy decode's reward of each answer's prompt —
    -> A = r(sample) − r(greedy) (arXiv:2310.10505, Algorithm 1)."""
    return sample_rewards - greedy_rewards


def reinforce_loss(seq_logp: Tensor, adv: Tensor) -> Tensor:
    """Per-answer policy-gradient loss −A · log π(y|x), (B,) inputs: seq_logp summed over the answer's
    tokens, adv treated as a constant. On-policy: no importance ratio, so no clipping."""
    return -adv.detach() * seq_logp


# ───────────── rollout ─────────────


def seq_logps(model, batch: dict, temperature: float) -> Tensor:
    """log π(y|x) of each answer of a packed row, summed over its tokens, from logits / τ: (n,)."""
    logp, _ = common.token_logps(model, batch, temperature=temperature)
    return common.sequence_logps(logp, batch)


def rollout(
    policy, ref, tokenizer, prompts: list[dict], seeds: list[int], args: Args, reward_model, device
) -> tuple[list[dict], dict]:
    """Sample G answers per prompt, all groups in one batch, each answer by its own seeded sampler (1 rank
    or N sample the same), score them, subtract the KL penalty, and attach each answer's advantage.
    Returns (samples, stats)."""
    t0 = time.time()
    gens = common.generate(
        policy, tokenizer, [p["prompt"] for p in prompts for _ in range(args.group_size)], args.max_new_tokens,
        temperature=args.temperature, seeds=[common.hash_int([s, j]) for s in seeds for j in range(args.group_size)],
        batch_size=64,
    )  # fmt: skip
    flat = [p for p in prompts for _ in range(args.group_size)]
    task_reward = common.answer_scores(flat, [g["text"] for g in gens], reward_model, device, args.format_reward, args.max_tokens)
    greedy_reward = None
    if args.estimator == "remax":  # the baseline: one greedy answer per prompt
        greedy = common.generate(policy, tokenizer, [p["prompt"] for p in prompts], args.max_new_tokens)
        greedy_texts = [g["text"] for g in greedy]
        greedy_reward = common.answer_scores(prompts, greedy_texts, reward_model, device, args.format_reward, args.max_tokens)
        greedy_reward = greedy_reward.repeat_interleave(args.group_size)
    gen_s = time.time() - t0
    samples = [common.answer_sample(g) for g in gens]
    kl = torch.zeros(len(samples))
    if ref is not None:  # KL in the reward: the summed k1 of each answer comes off its reward
        for idx, batch in common.packed_batches(samples, args.max_tokens, args.share_prompt):
            batch = common.to_device(batch, device)
            with torch.no_grad(), common.autocast(device):
                kl[idx] = (seq_logps(policy, batch, args.temperature) - seq_logps(ref, batch, args.temperature)).float().cpu()
    reward = task_reward - args.beta * kl
    if args.estimator == "rloo":
        adv = rloo_advantages(reward, args.group_size)
    else:
        adv = remax_advantages(reward, greedy_reward)  # the greedy answer's task reward: any baseline that
        # does not depend on the sample keeps the gradient unbiased, so its own KL need not be computed
    for s, a in zip(samples, adv.tolist()):
        s["adv"] = a
    stats = {
        "reward/mean": float(task_reward.mean()), "reward/std": float(task_reward.std()) if len(gens) > 1 else 0.0,
        "kl": float(kl.mean()), "response_length": sum(len(g["completion_ids"]) for g in gens) / len(gens),
        "truncated_frac": sum(not g["ended"] for g in gens) / len(gens),
        "time/generation_s": gen_s,
    }  # fmt: skip
    if greedy_reward is not None:
        stats["reward/greedy"] = float(greedy_reward.mean())
    if all("answer" in p for p in prompts):
        stats["accuracy"] = sum(common.rule_reward(g["text"], p["answer"]) for g, p in zip(gens, flat)) / len(gens)
    return samples, stats


# ───────────── training ─────────────


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out_dir = common.start_run(args, args.estimator, rank)
    if args.prompts_per_step % world:
        raise common.UserError(
            f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} ranks (whole groups per rank)"
        )
    if args.estimator == "rloo" and args.group_size < 2:
        raise common.UserError("--estimator rloo needs --group-size ≥ 2")

    tokenizer = common.load_tokenizer(args.model)
    policy = common.load_model(args.model, tokenizer, seed=args.seed, dropout=args.dropout).to(device)
    ref = copy.deepcopy(policy).requires_grad_(False).eval() if args.beta else None  # β = 0: no reference at all
    reward_model = None
    if args.reward_model:
        rm = common.load_reward_model(args.reward_model).to(device)
        reward_model = (rm, common.load_tokenizer(args.reward_model))

    builtin = args.data == "builtin"
    prompts = common.builtin_prompts("train", args.num_train, args.seed) if builtin else common.read_prompts(args.data, tokenizer)
    if not args.reward_model and not all("answer" in p for p in prompts):
        missing = next(p for p in prompts if "answer" not in p)
        raise common.DataError(
            f"{missing['_where']}: missing field 'answer' (the rule reward needs it; or pass --reward-model)"
        )
    problems = common.builtin_task("test", args.num_eval, args.seed) if builtin else []

    policy = common.shard_model(policy, args.fsdp)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, fused=not common.sharded(policy))
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps, args.max_steps)
    start = common.load_checkpoint(out_dir, policy, optimizer, scheduler)[0] if args.resume else 0

    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("reward/mean", "accuracy"))
    if start == 0 and problems:
        log.log(0, {"eval/accuracy": common.greedy_accuracy(policy, tokenizer, problems, args.max_new_tokens, rank, world)})
    for step in range(start, args.max_steps):
        # 1. generate and score this rank's whole groups; advantages from the sampled baseline
        idx = common.step_indices(len(prompts), args.prompts_per_step, step, args.seed)[rank::world]
        seeds = [common.hash_int([args.seed, step, i]) for i in idx]
        samples, stats = rollout(policy, ref, tokenizer, [prompts[i] for i in idx], seeds, args, reward_model, device)
        t0 = time.time()
        # 2. one policy-gradient update, −A · log π(y|x) averaged over all answers of all ranks
        n_answers = float(common.all_reduce_sum(torch.tensor(float(len(samples)))))
        loss_sum = 0.0
        for batch_idx, batch in common.packed_batches(samples, args.max_tokens, args.share_prompt):
            batch = common.to_device(batch, device)
            with common.autocast(device):
                seq = seq_logps(policy, batch, args.temperature)  # (n,)
            adv = torch.tensor([samples[i]["adv"] for i in batch_idx], device=device)
            loss = reinforce_loss(seq, adv).sum() / n_answers
            loss.backward()
            loss_sum += loss.item()
        grad_norm = common.optimizer_step(policy, optimizer, args.max_grad_norm, step)
        scheduler.step()

        loss_total = float(common.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64)))
        metrics = {"loss": loss_total, **common.reduce_metrics(stats, world), "grad_norm": float(grad_norm),
                   "lr": scheduler.get_last_lr()[0], "time/training_s": time.time() - t0}  # fmt: skip
        log.log(step + 1, metrics)
        if problems and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            log.log(
                step + 1,
                {"eval/accuracy": common.greedy_accuracy(policy, tokenizer, problems, args.max_new_tokens, rank, world)},
            )
        if args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(out_dir, step + 1, policy, optimizer, scheduler, rank)

    if problems:
        log.log(
            args.max_steps,
            {"eval/accuracy": common.greedy_accuracy(policy, tokenizer, problems, args.max_new_tokens, rank, world)},
        )
    return common.finish_run(log, policy, tokenizer, out_dir, rank, args.keep_checkpoints)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
