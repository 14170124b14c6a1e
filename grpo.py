"""Group Relative Policy Optimization (GRPO), Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300,
with the refinements of DAPO (Yu et al. 2025, arXiv:2503.14476) and Dr. GRPO (Liu et al. 2025,
arXiv:2503.20783) as options. RL from verifiable rewards, no critic.

Each step samples G answers per prompt from the current policy, scores them (the rule reward: right
answer, plus a little for the answer format; or a reward model) and gives every token of answer i
the group-relative advantage
    A_i = (r_i − mean_g r) / std_g r             (--scale none: r_i − mean_g r, Dr. GRPO)
Then, per answer token t, with ρ_t = π(y_t|·) / π_old(y_t|·):
    ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i) + β k3_t,   k3 = (π_ref/π − 1) − log(π_ref/π)
averaged over tokens (--loss-agg token, DAPO), over each answer then over answers (sequence, the
original GRPO) or summed over a fixed budget (constant, Dr. GRPO). ε_high > ε_low is DAPO's
clip-higher. The KL term sits in the loss, as in GRPO's eq. 3 (not in the reward, as PPO-RLHF puts it);
--beta 0 drops the reference model. Newer options, each named after its paper in Args:
    --importance-level sequence   GSPO (arXiv:2507.18071): ρ_i = (π(y_i)/π_old(y_i))^(1/|y_i|), one per answer
    --policy-loss cispo           CISPO (MiniMax-M1, arXiv:2506.13585): ℓ_t = −sg(clip(ρ_t)) A_i log π_t
    --kl-weighted                 β·sg(ρ_t)·k3_t, unbiased when μ > 1 (DeepSeek-V3.2, arXiv:2512.02556)
    --scale batch                 A_i = (r_i − mean_g r) / std_batch r (Lite PPO, arXiv:2508.08221)
    --tis-cap, --mismatch-band    reweight tokens / drop answers by π_old/π_sampler, the sampler–trainer mismatch

    torchrun --nproc_per_node 2 grpo.py
"""

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch import Tensor

import common


@dataclass
class Args:
    """Critic-free RL from verifiable rewards with GRPO (and DAPO / Dr. GRPO options)."""

    # model and data
    model: str = common.DEFAULT_MODEL
    """policy to train, and the reference; "tiny" for tests"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
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
    """G: answers sampled per prompt"""
    prompts_per_step: int = 8
    """prompts per rollout, over all ranks (each rank samples whole groups); 8 × 15 steps: the validated
    runs (tests/validate.py grpo-8x15, two seeds each within 1 point of 10; 4 × 20 varied 3.5–10.2)"""
    temperature: float = 1.0
    """sampling temperature; the training forward divides the logits by it too"""
    max_new_tokens: int = 64
    """generation budget per answer (the T of --loss-agg constant)"""
    gen_batch_size: int = 64
    """answers decoded together (all of a rank's groups at once by default)"""
    scale: Literal["std", "none", "batch"] = "std"
    """advantage: r − group mean, divided by the group's std (GRPO), by nothing (Dr. GRPO) or by the std
    of the whole step's rewards over all ranks (batch: "Lite PPO", arXiv:2508.08221; ScaleRL)"""
    policy_loss: Literal["clip", "cispo"] = "clip"
    """clip: PPO's clipped surrogate (GRPO, DAPO); cispo: the clipped, stop-gradient ratio times log π
    (MiniMax-M1, arXiv:2506.13585 eq. 4), so clipped tokens keep their gradient"""
    importance_level: Literal["token", "sequence"] = "token"
    """token: one ratio per token (GRPO); sequence: one per answer, the geometric mean of its token
    ratios, clipped as a whole (GSPO, arXiv:2507.18071 eq. 5-7)"""
    clip_low: float | None = None
    """ε_low: the ratio is clipped below at 1 − ε_low; default 0.2, GSPO's 3e-4 with --importance-level
    sequence, 1.0 (no lower bound, as MiniMax-M1) with --policy-loss cispo"""
    clip_high: float | None = None
    """ε_high: the ratio is clipped above at 1 + ε_high; default 0.28 (DAPO's clip-higher; = clip_low
    for plain GRPO), GSPO's 4e-4 with --importance-level sequence"""
    beta: float = 0.04
    """β of the k3 KL term in the loss (DeepSeekMath's 0.04); 0 loads no reference model"""
    kl_weighted: bool = False
    """weight k3 by the detached ratio π/π_old, so the KL term stays unbiased when the samples come from
    π_old (μ > 1); as DeepSeek-V3.2 (arXiv:2512.02556) does. Identical to plain k3 at μ = 1"""
    loss_agg: Literal["token", "sequence", "constant"] | None = None
    """token: mean over all answer tokens (DAPO; the default); sequence: per answer, then over answers (GRPO;
    the default with --importance-level sequence: GSPO's eq. 5 averages over answers, and with token averaging
    GSPO's gradient at μ = 1 is exactly GRPO's); constant: sum / (answers × max_new_tokens) (Dr. GRPO)"""
    tis_cap: float = 0.0
    """truncated importance sampling against the sampler–trainer mismatch: each token's policy term is
    weighted by min(π_old/π_sampler, C), π_sampler the sampler's own probability (Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"); 0: off"""
    mismatch_band: float = 0.0
    """leave out answers whose geometric-mean ratio π_old/π_sampler is outside [1 − δ, 1 + δ]
    (sequence-level masking against the mismatch); 0: off"""
    mu: int = 1
    """μ: policy updates per rollout batch (1: on-policy, ρ = 1 and no old-policy pass)"""
    filter_zero_std: bool = False
    """drop groups whose rewards are all equal (no signal) from the update (DAPO dynamic sampling,
    without resampling: the step trains on fewer groups)"""
    overlong: Literal["mask", "penalty", "none"] = "mask"
    """answers cut off by max_new_tokens: left out of the loss (mask), reward − 1 (penalty), or kept"""
    # optimisation
    lr: float = 1e-5
    """peak AdamW learning rate (the validated runs, tests/validate.py grpo-8x15; on the H200 3e-5 lost accuracy, 1e-5 gained)"""
    max_steps: int = 15
    """rollout steps (each: sample, score, μ updates)"""
    warmup_steps: int = 0
    """linear warm-up steps before the cosine decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    max_tokens: int = 4096
    """tokens per packed micro-batch of the update"""
    share_prompt: bool = True
    """a group's prompt once in the packed row, its answers attending to it (common.collate_shared): exact, fewer tokens"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    # run
    eval_every: int = 10
    """steps between greedy evaluations (also before and after training); 0: only those"""
    save_every: int = 10
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    output_dir: str = ""
    """where the model, args.json and metrics.jsonl go; default runs/grpo-<timestamp>"""
    seed: int = 0
    """seed for prompt order and sampling"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state across ranks (FSDP2) instead of replicating"""


# ───────────── advantages and loss ─────────────


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", batch_std: float | None = None) -> Tensor:
    """rewards: (B,) with the G = group_size answers of each prompt adjacent. Returns (B,).

    A_i = (r_i − mean_g) / std_g        GRPO, arXiv:2402.03300 (§4.1.2)
    A_i =  r_i − mean_g                 scale="none", Dr. GRPO, arXiv:2503.20783
    A_i = (r_i − mean_g) / std_batch    scale="batch", Lite PPO, arXiv:2508.08221: the std of every
                                        reward of the step (batch_std; default: of `rewards`)
    A group whose rewards are all equal gets exactly A = 0 (no NaN, and not the float rounding of
    r − mean, which the clamped std would blow up): it carries no signal."""
    r = rewards.view(-1, group_size)  # (B,) -> (B/G, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        adv = adv / r.std(dim=1, keepdim=True).nan_to_num(0.0).clamp(min=1e-6)
    elif scale == "batch":
        adv = adv / max(float(rewards.std()) if batch_std is None else batch_std, 1e-6)
    tied = (r == r[:, :1]).all(dim=1, keepdim=True)  # (B/G, 1)
    return adv.masked_fill(tied, 0.0).view(-1)


def grpo_loss(
    logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, adv: Tensor, mask: Tensor,
    clip_low: float, clip_high: float, beta: float, agg: str = "token",
    policy_loss: str = "clip", level: str = "token", kl_weighted: bool = False, is_weight: Tensor | None = None,
) -> tuple[Tensor, dict]:  # fmt: skip
    """Clipped surrogate + β·k3, aggregated. logp, old_logp, ref_logp, mask: (B, T) per answer token;
    adv: (B,). Returns (loss, diagnostics).

        ρ = exp(logp − old_logp)                                           level="token"
        ρ = exp(Σ_t (logp − old_logp) / |y|), the same for every token     level="sequence" (GSPO eq. 7)
        ℓ = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) + β k3(logp, ref_logp)
        ℓ = −sg(clip(ρ, 1 − ε_low, 1 + ε_high)) A logp + β k3                policy_loss="cispo" (MiniMax-M1 eq. 4)
        with kl_weighted, β·sg(π/π_old)·k3: the samples come from π_old, so this is the unbiased estimate
        of KL(π‖π_ref) when μ > 1 (DeepSeek-V3.2, arXiv:2512.02556, its unbiased KL estimate)
        is_weight (B, T), when given, multiplies each token's policy term (TIS, see sampler_correction)
        token:    Σ ℓ·mask / Σ mask                          DAPO
        sequence: mean_i (Σ_t ℓ·mask / Σ_t mask)             GRPO
        constant: Σ ℓ·mask / (B · T), T = mask.shape[-1]     Dr. GRPO (T: the generation budget)

    The KL term: k3 = (π_ref/π − 1) − log(π_ref/π) is an unbiased estimate of KL(π‖π_ref), but in the
    loss its expected gradient is that of KL(π_ref‖π), the forward KL (k3 is from Schulman's note on KL
    approximations, http://joschu.net/blog/kl-approx.html; the gradient is checked exactly in tests/test_grpo.py).
    Masked tokens (padding, cut-off answers) are out of both numerator and denominator."""
    mask = mask.float()
    log_ratio = logp - old_logp
    if level == "sequence":  # GSPO: one length-normalised ratio per answer, on each of its tokens
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = torch.exp(log_ratio)
    a = adv[:, None]  # (B,) -> (B, 1), one advantage for every token of an answer
    if policy_loss == "cispo":  # the weight is a constant: a clipped token still carries A·∇log π
        per_token = -ratio.clamp(1 - clip_low, 1 + clip_high).detach() * a * logp
    else:
        per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = common.kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if kl_weighted:
        kl = torch.exp(logp - old_logp).detach() * kl
    if beta:
        per_token = per_token + beta * kl
    if agg == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif agg == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif agg == "constant":
        loss = (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
    else:
        raise ValueError(f"unknown aggregation {agg!r}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_frac_low": (((ratio < 1 - clip_low) & (a < 0)).float() * mask).sum() / n,  # clipped, A < 0
            "clip_frac_high": (((ratio > 1 + clip_high) & (a > 0)).float() * mask).sum() / n,  # clipped, A > 0
            "kl": (kl * mask).sum() / n,
        }
    return loss, stats


def sampler_correction(old: Tensor, sampler: Tensor, mask: Tensor, cap: float, band: float) -> tuple[Tensor, Tensor]:
    """The sampler–trainer mismatch. old, sampler, mask: (B, T): the trainer's log-probs of the sampled
    tokens and the sampler's own. Returns (weights (B, T), keep (B,)):
        weights = min(π_old/π_sampler, cap) per token, TIS (1 when cap is 0)
        keep    = 1 − band ≤ exp(mean_t log(π_old/π_sampler)) ≤ 1 + band per answer (all when band is 0)"""
    log_ratio = (old - sampler) * mask
    weights = torch.exp(log_ratio).clamp(max=cap) if cap else torch.ones_like(old)
    geo = torch.exp(log_ratio.sum(-1) / mask.sum(-1).clamp(min=1))
    keep = (geo >= 1 - band) & (geo <= 1 + band) if band else torch.ones(len(old), dtype=torch.bool, device=old.device)
    return weights, keep


# ───────────── rollout ─────────────


def rollout(policy, tokenizer, prompts: list[dict], seeds: list[int], args: Args, reward_model, device):
    """Sample G answers per prompt and score them. Returns (generations, rewards (N,), stats).

    Answer j of prompt i is sampled by its own seeded sampler (common.RowSampler, seed of (seed, step,
    prompt i, j)), so every group of the step goes through generate as one batch, and an answer still
    depends only on its seed, not on which rank samples it or what else is in the batch: 1 or N ranks
    and a resumed run sample the same answers."""
    t0 = time.time()
    gens = common.generate(
        policy, tokenizer, [p["prompt"] for p in prompts for _ in range(args.group_size)], args.max_new_tokens,
        temperature=args.temperature, seeds=[common.hash_int([s, j]) for s in seeds for j in range(args.group_size)],
        batch_size=args.gen_batch_size,
    )  # fmt: skip
    gen_s = time.time() - t0
    flat = [p for p in prompts for _ in range(args.group_size)]
    texts = [g["text"] for g in gens]
    ended = torch.tensor([g["ended"] for g in gens])
    reward = common.answer_scores(flat, texts, reward_model, device, args.format_reward, args.max_tokens)
    if args.overlong == "penalty":
        reward = reward - (~ended).float()
    stats = {
        "reward/mean": float(reward.mean()), "reward/std": float(reward.std()) if len(reward) > 1 else 0.0,
        "response_length": sum(len(g["completion_ids"]) for g in gens) / len(gens), "truncated_frac": float((~ended).float().mean()),
        "distinct_2": common.distinct_2([g["completion_ids"] for g in gens]), "time/generation_s": gen_s,
    }  # fmt: skip
    if all("answer" in p for p in prompts):
        stats["accuracy"] = sum(common.rule_reward(t, p["answer"]) for p, t in zip(flat, texts)) / len(texts)
    return gens, reward, stats


def sampler_row(gen: dict, width: int) -> dict:
    """The sampler's own log-probs of an answer's tokens, left aligned in a (width,) row, and the row's
    answer mask (nothing when the answer was decoded greedily)."""
    if "sampler_logps" not in gen:
        return {}
    n = len(gen["sampler_logps"])
    return {"sampler": torch.tensor(gen["sampler_logps"] + [0.0] * (width - n)), "answer_mask": torch.arange(width) < n}


def training_samples(gens: list[dict], reward: Tensor, args: Args) -> tuple[list[dict], float]:
    """Answers -> training samples with their group-relative advantage, leaving out cut-off answers
    (--overlong mask) and groups whose rewards are all equal (--filter-zero-std; such a group carries no
    signal). Returns (samples, the fraction of answers in equal-reward groups)."""
    ended = torch.tensor([g["ended"] for g in gens])
    batch_std = None
    if args.scale == "batch":  # the std of the step's rewards on all ranks, so 1 or N ranks give the same A
        t = common.sum_over_ranks({"n": len(reward), "sum": float(reward.sum()), "sq": float((reward.double() ** 2).sum())})
        batch_std = math.sqrt(max(t["sq"] - t["sum"] ** 2 / t["n"], 0.0) / max(t["n"] - 1, 1))
    adv = group_advantages(reward, args.group_size, args.scale, batch_std)
    zero_std = (reward.view(-1, args.group_size).std(1).nan_to_num(0.0) == 0).repeat_interleave(args.group_size)
    keep = torch.ones(len(gens), dtype=torch.bool)
    if args.overlong == "mask":
        keep &= ended  # a cut-off answer has no honest ending: out of the loss (DAPO's overlong filtering)
    if args.filter_zero_std:
        keep &= ~zero_std
    samples = [{**common.answer_sample(g), "adv": a, **sampler_row(g, args.max_new_tokens)}
               for g, a, k in zip(gens, adv.tolist(), keep.tolist()) if k and g["completion_ids"]]  # fmt: skip
    return samples, float(zero_std.float().mean())


def needs_old(args: Args) -> bool:
    """Old log-probs need their own pass when the update is off-policy (μ > 1) or answers are masked by
    their mismatch before the update (--mismatch-band); else the update's own forward gives them."""
    return args.mu > 1 or args.mismatch_band > 0


@torch.no_grad()
def old_and_ref_logps(policy, ref, samples: list[dict], args: Args, device) -> None:
    """Record each sample's old log-probs (μ > 1) and reference log-probs (β > 0), micro-batch by
    micro-batch exactly as the update will see them."""
    batches = common.packed_batches(samples, args.max_tokens, args.share_prompt)
    for item in common.even_out(batches, policy) if needs_old(args) else batches:
        if item is None:  # --fsdp: this rank is out of micro-batches
            common.stand_in(policy, device)
            continue
        batch_idx, batch = item
        batch = common.to_device(batch, device)
        with common.autocast(device):
            if needs_old(args):
                old, _ = common.answer_logps(policy, batch, args.max_new_tokens, args.temperature)
            if ref is not None:
                ref_logp, _ = common.answer_logps(ref, batch, args.max_new_tokens, args.temperature)
        for j, i in enumerate(batch_idx):
            if needs_old(args):
                samples[i]["old"] = old[j].cpu()
            if ref is not None:
                samples[i]["ref"] = ref_logp[j].cpu()


# ───────────── training ─────────────


def loss_defaults(args: Args) -> dict:
    """ε_low, ε_high and the aggregation: the given ones, else the chosen loss's: GSPO's (3e-4, 4e-4), the paper's
    own setting (a sequence ratio is a geometric mean, so it strays far less than a token's), and its mean over
    answers; CISPO's (1.0, 0.28) (no lower bound: MiniMax-M1 tunes only the upper one); DAPO's (0.2, 0.28), token mean."""
    gspo = args.importance_level == "sequence"
    low, high = (3e-4, 4e-4) if gspo else (1.0, 0.28) if args.policy_loss == "cispo" else (0.2, 0.28)
    return {"clip_low": low if args.clip_low is None else args.clip_low, "clip_high": high if args.clip_high is None else args.clip_high,
            "loss_agg": args.loss_agg or ("sequence" if gspo else "token")}  # fmt: skip


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    args = dataclasses.replace(args, **loss_defaults(args))  # args.json shows them
    if (args.tis_cap or args.mismatch_band) and args.temperature <= 0:
        raise common.UserError("--tis-cap / --mismatch-band compare the trainer with the sampler: they need --temperature > 0")
    out_dir = common.start_run(args, "grpo", rank)
    if args.prompts_per_step % world:
        raise common.UserError(
            f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} ranks (whole groups per rank)"
        )

    tokenizer = common.load_tokenizer(args.model)
    policy = common.load_model(args.model, tokenizer, seed=args.seed, dropout=args.dropout).to(device)
    ref = copy.deepcopy(policy).requires_grad_(False).eval() if args.beta else None  # β = 0: no reference at all
    reward_model = None
    if args.reward_model:
        rm = common.load_reward_model(args.reward_model).to(device)
        reward_model = (rm, common.load_tokenizer(args.reward_model))
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps * args.mu, args.max_steps * args.mu)
    start = common.load_checkpoint(out_dir, policy, optimizer, scheduler)[0] if args.resume else 0

    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("reward/mean", "accuracy"))
    if start == 0 and problems:
        log.log(0, {"eval/accuracy": common.greedy_accuracy(policy, tokenizer, problems, args.max_new_tokens, rank, world)})
    for step in range(start, args.max_steps):
        # 1. sample G answers per prompt and score them: this rank's whole groups, each from a seed of (seed, step, prompt)
        idx = common.step_indices(len(prompts), args.prompts_per_step, step, args.seed)[rank::world]
        seeds = [common.hash_int([args.seed, step, i]) for i in idx]
        gens, reward, stats = rollout(policy, tokenizer, [prompts[i] for i in idx], seeds, args, reward_model, device)
        # 2. group-relative advantages; cut-off answers and equal-reward groups left out as the options say
        samples, stats["zero_std_frac"] = training_samples(gens, reward, args)
        # 3. old (μ > 1, --mismatch-band) and reference (β > 0) log-probs of the answers kept; answers the
        #    sampler drew too differently from the trainer leave the update (--mismatch-band)
        old_and_ref_logps(policy, ref, samples, args, device)
        if args.mismatch_band:
            rows = [torch.stack([x[k] for x in samples]) for k in ("old", "sampler", "answer_mask")] if samples else None
            keep = sampler_correction(*rows, 0.0, args.mismatch_band)[1].tolist() if samples else []
            dropped = common.sum_over_ranks({"out": keep.count(False), "all": len(keep)})  # the same on every rank
            stats["mismatch/masked_frac"] = dropped["out"] / max(dropped["all"], 1)
            samples = [x for x, k in zip(samples, keep) if k]
        t0 = time.time()
        # 4. the step's denominators over all ranks: answer tokens (token) or answers (sequence, constant)
        n_tok = float(
            common.all_reduce_sum(torch.tensor(float(sum(sum(t != common.IGNORE for t in s["labels"]) for s in samples))))
        )
        n_seq = float(common.all_reduce_sum(torch.tensor(float(len(samples)))))
        total = n_tok if args.loss_agg == "token" else n_seq
        # 5. μ updates on the rollout; old log-probs were recorded at sampling time (μ = 1: the current
        #    ones, ρ = 1 and the clipped surrogate is the plain policy gradient)
        sums = common.Sums("clip_frac_low", "clip_frac_high", "kl", "entropy", "tokens", "loss", "mismatch_abs", "mismatch_seq")
        mismatch_max = torch.zeros(())
        for inner in range(args.mu):
            for item in common.even_out(common.packed_batches(samples, args.max_tokens, args.share_prompt) if total else [], policy):
                if item is None:  # --fsdp: this rank is out of micro-batches
                    common.stand_in(policy, device, backward=True)
                    continue
                batch_idx, batch = item
                batch = common.to_device(batch, device)
                in_batch = [samples[i] for i in batch_idx]
                with common.autocast(device):
                    logp, entropy = common.answer_logps(policy, batch, args.max_new_tokens, args.temperature, entropy=True)
                mask = common.completion_matrix((batch["labels"] != common.IGNORE).float(), batch, args.max_new_tokens)
                old = torch.stack([s["old"] for s in in_batch]).to(device) if needs_old(args) else logp.detach()
                ref_logp = torch.stack([s["ref"] for s in in_batch]).to(device) if ref is not None else None
                adv = torch.tensor([s["adv"] for s in in_batch], device=device)
                weight = None
                if "sampler" in in_batch[0]:  # the mismatch: the trainer's log-probs against the sampler's own
                    sampler = torch.stack([s["sampler"] for s in in_batch]).to(device)
                    gap = (old - sampler) * mask
                    if inner == 0:
                        mismatch_max = torch.maximum(mismatch_max, gap.abs().max().cpu())
                        sums.add(mismatch_abs=gap.abs().sum(), mismatch_seq=-gap.sum())
                    weight = sampler_correction(old, sampler, mask, args.tis_cap, 0.0)[0] if args.tis_cap else None
                loss, st = grpo_loss(logp, old, ref_logp, adv, mask, args.clip_low, args.clip_high, args.beta, args.loss_agg,
                                     args.policy_loss, args.importance_level, args.kl_weighted, weight)  # fmt: skip
                units = mask.sum() if args.loss_agg == "token" else float(len(in_batch))
                share = loss * units / total  # the micro-batch's share of the step's aggregate
                share.backward()
                n = mask.sum().item()
                sums.add(clip_frac_low=st["clip_frac_low"].item() * n, clip_frac_high=st["clip_frac_high"].item() * n,
                         kl=st["kl"].item() * n, entropy=float((entropy.detach() * mask).sum()), tokens=n,
                         loss=share.item() / args.mu)  # fmt: skip
            if not total:
                break  # no answer left to train on this step (all cut off or filtered), on every rank
            grad_norm = common.optimizer_step(policy, optimizer, args.max_grad_norm, step)
            scheduler.step()

        s = sums.total()
        tok = max(s.pop("tokens"), 1.0)
        mismatch = {"mismatch/abs_mean": s.pop("mismatch_abs") * args.mu / tok, "mismatch/kl_seq": s.pop("mismatch_seq") / max(n_seq, 1),
                    "mismatch/abs_max": float(common.all_reduce_max(mismatch_max))}  # fmt: skip
        metrics = {"loss": s.pop("loss"), **common.reduce_metrics(stats, world), **{k: v / tok for k, v in s.items()},
                   **(mismatch if args.temperature > 0 else {}), "lr": scheduler.get_last_lr()[0], "time/training_s": time.time() - t0}  # fmt: skip
        metrics["trained_answers"] = n_seq  # over all ranks, after --overlong mask and --filter-zero-std
        if total:
            metrics["grad_norm"] = float(grad_norm)
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
