"""PPO for RLHF, the InstructGPT loop (Ouyang et al. 2022, arXiv:2203.02155): PPO (Schulman et al. 2017,
arXiv:1707.06347) with GAE (Schulman et al. 2015, arXiv:1506.02438), a per-token KL penalty in the reward
and the adaptive KL controller of Ziegler et al. 2019 (arXiv:1909.08593). Every detail listed by Huang et
al., "The N Implementation Details of RLHF with PPO" (arXiv:2403.17031) is an Args field below, with its
default and the reason for it.

Four models:
    actor      π_θ    trained: the policy gradient             --model
    critic     V_φ    trained: regression on the returns       a scalar head on the reward model's or the
                                                                 policy's backbone (--critic-init)
    reference  π_ref  frozen: the actor as it started          its log-probs anchor the KL penalty
    reward     r      frozen: an rm.py output (--reward PATH)  or the built-in rule reward (--reward rule)
Memory: four 135M models and AdamW state for two, ~8 GB in fp32. One backbone with two heads (the losses
then pull on the same weights), LoRA with the reference as the adapter-free base, or bf16 frozen models
would cut it; four separate models keep each role visible.

One step:
 1. sample an answer per prompt (temperature τ, stop at EOS); score it: r(x, y), minus
    --missing-eos-penalty when it was cut off before EOS
 2. old log-probs of the actor, of the reference and the old values, in fp32 from logits / τ, through
    the same packed forward as the update's first minibatch, so the first PPO ratio is exactly 1
 3. per-token reward, the KL in the reward (InstructGPT eq. 2):  r_t = −β k1_t  (k1 = log π_old − log π_ref)  on every
    answer token, plus r(x, y) at the last one
 4. GAE:  δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1}  (V and A are 0 past the answer's end);
    returns R_t = A_t + V_t; A whitened over the valid tokens of the whole rollout
 5. --ppo-epochs passes over --num-minibatches shuffled minibatches, each one optimizer step of
        L = mean_t[ −min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t) ] + c_v mean_t[ ½ max((V_t − R_t)², (V_clip,t − R_t)²) ]
            − c_e mean_t[ H_t ],     ρ_t = π_θ / π_old,   V_clip = V_old + clip(V − V_old, ±ε_v)
 6. the adaptive KL controller (Ziegler et al.): e = clip(KL / KL_target − 1, ±0.2), β ← β (1 + e · n / horizon)
    with KL the mean over answers of Σ_t k1_t and n the answers in the step

    torchrun --nproc_per_node 2 ppo.py
"""

import copy
import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import tyro
from torch import Tensor

import common


@dataclass
class Args:
    """PPO-RLHF: actor, critic, frozen reference and frozen reward (a model or the rule)."""

    # model and data
    model: str = common.DEFAULT_MODEL
    """actor to train, and the reference; "tiny" for tests"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    reward: Annotated[str, tyro.conf.arg(aliases=["--reward-model"])] = "rule"
    """"rule" (right answer, plus --format-reward for the format) or an rm.py output directory"""
    critic_init: Literal["policy", "reward"] = "policy"
    """backbone of the value model: the policy's (works with the rule reward) or the reward model's (it
    starts out knowing what scores well, as in InstructGPT); its scalar head is new or the RM's"""
    data: str = "builtin"
    """JSONL of {"prompt", "answer"} for the rule reward (any prompt with a reward model), or "builtin" """
    num_train: int = 2000
    """built-in training prompts"""
    num_eval: int = 64
    """built-in held-out problems for greedy accuracy"""
    format_reward: float = 0.1
    """rule reward: added when the answer uses the format "The answer is N", right or wrong"""
    # rollout
    prompts_per_step: int = 16
    """rollout batch: prompts (one answer each) per step, over all ranks"""
    temperature: float = 1.0
    """sampling temperature; the ratio, KL and entropy use logits / τ too: they describe the policy that sampled"""
    max_new_tokens: int = 64
    """generation budget per answer"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of an answer cut off before EOS, unfinished text no RM was trained on (N details #4)"""
    # reward shaping
    beta: float = 0.05
    """initial β of the per-token KL penalty −β·k1 in the reward"""
    target_kl: float = 0.0
    """adaptive β (Ziegler et al.) steering Σ_t k1 per answer to this value; 0: β stays fixed"""
    kl_horizon: int = 10000
    """adaptive β: answers over which a 20% error changes β by a factor e^0.2"""
    whiten_rewards: bool = False
    """divide the per-token rewards by their std over the rollout (mean kept) before GAE"""
    gamma: float = 1.0
    """discount: 1, the answer is one episode and only its end is scored"""
    lam: float = 0.95
    """GAE λ: 0 is one-step TD (biased by V), 1 is the Monte-Carlo return (high variance)"""
    whiten_advantages: bool = True
    """zero mean, unit std advantages over the rollout's valid tokens (N details #9)"""
    # PPO update
    ppo_epochs: int = 2
    """passes over each rollout (4 in the N details; 2 keeps a CPU step short)"""
    num_minibatches: int = 2
    """optimizer steps per epoch; the rollout is reshuffled into minibatches every epoch"""
    clip_eps: float = 0.2
    """ε: ρ is clipped to [1 − ε, 1 + ε]"""
    vf_clip: float = 0.2
    """ε_v: the new value may move at most this far from the old one before its loss stops growing"""
    vf_coef: float = 0.1
    """c_v: weight of the value loss (0.1 as in the N details; the critic has its own optimizer anyway)"""
    ent_coef: float = 0.0
    """c_e: entropy bonus; 0, as the KL penalty already keeps the policy from collapsing"""
    max_approx_kl: float = 0.0
    """stop the step's remaining epochs once an epoch's mean approx KL(π_old‖π_θ) exceeds this; 0: never"""
    # optimisation
    lr: float = 1e-5
    """actor AdamW learning rate (peak, cosine decay)"""
    critic_lr: float = 2e-5
    """critic AdamW learning rate (peak, cosine decay): higher, its head starts from scratch"""
    max_steps: int = 16
    """rollout steps (16 × 16 answers: the validated run, tests/validate.py ppo)"""
    warmup_steps: int = 0
    """linear warm-up rollout steps before the cosine decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm), for the actor and the critic separately"""
    max_tokens: int = 4096
    """tokens per packed micro-batch"""
    # run
    eval_every: int = 8
    """steps between greedy evaluations (also before and after training); 0: only those"""
    save_every: int = 8
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    fsdp: bool = False
    """shard the policy's decoder layers across ranks (FSDP2); the critic, reference and reward model stay replicated"""
    output_dir: str = ""
    """where the model, args.json and metrics.jsonl go; default runs/ppo-<timestamp>"""
    seed: int = 0
    """seed for prompt order, sampling and minibatch shuffling"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""


# ───────────── advantages and loss ─────────────


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """rewards, values, mask: (B, T), each row an answer whose valid tokens come first. Returns
    (advantages, returns), (B, T), 0 past the answer's end.

        δ_t = r_t + γ V_{t+1} − V_t          (V_{t+1} = 0 after the last valid token: the episode ends)
        A_t = δ_t + γλ A_{t+1}               (backward, O(T))
        R_t = A_t + V_t                      the critic's regression target"""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(values)
    next_value = next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask


def ppo_loss(
    logp: Tensor, old_logp: Tensor, values: Tensor, old_values: Tensor, returns: Tensor, adv: Tensor,
    entropy: Tensor, mask: Tensor, clip_eps: float, vf_clip: float, vf_coef: float, ent_coef: float,
) -> tuple[Tensor, dict]:  # fmt: skip
    """All (B, T) per answer token. Means over the valid tokens (mask) of

        policy:   −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A),  ρ = exp(logp − old_logp)
        value:    ½ max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)
        loss = policy + vf_coef · value − ent_coef · entropy

    Diagnostics: approx_kl = mean of (ρ − 1) − log ρ, the k3 estimate of KL(π_old‖π_θ); clip_frac, the
    share of tokens whose ρ was clipped (its gradient is 0); vf_clip_frac, the same for the value."""
    mask = mask.to(logp.dtype)
    n = mask.sum().clamp(min=1)
    mean = lambda x: (x * mask).sum() / n
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    v_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    pg_loss, vf_loss, ent = mean(pg), mean(vf), mean(entropy)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * ent
    with torch.no_grad():
        stats = {
            "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "entropy": ent.detach(),
            "approx_kl": mean((ratio - 1) - log_ratio),
            "clip_frac": mean(((ratio - 1).abs() > clip_eps).to(logp.dtype)),
            "vf_clip_frac": mean(((values - old_values).abs() > vf_clip).to(logp.dtype)),
        }  # fmt: skip
    return loss, stats


def shaped_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards (B, T), the KL in the reward (InstructGPT, arXiv:2203.02155 eq. 2): −β·k1 on every
    valid answer token, and the score of the whole answer (B,) added at its last one (none if it has none)."""
    mask = mask.to(logp.dtype)
    rewards = -beta * common.kl_k1(logp, ref_logp) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    has = mask.sum(1) > 0
    rewards[has, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def adaptive_beta(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: β grows when the KL is over target, shrinks under it."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


# ───────────── models ─────────────


def value_model(policy, tokenizer):
    """The policy's backbone under a new scalar head (sequence classification class, so it saves and
    reloads like an rm.py output). The head starts at 0: the first values are 0, the first advantages
    pure returns."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    critic = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    critic.get_decoder().load_state_dict(policy.get_decoder().state_dict())
    torch.nn.init.zeros_(critic.score.weight)
    critic.set_attn_implementation(common.ATTN_IMPL)
    return critic


# ───────────── rollout ─────────────


def answer_values(critic, batch: dict, width: int) -> Tensor:
    """(n, width) V(s_t) for each answer token t: the head at the position before t, whose state has seen
    everything up to (not including) token t, the same alignment as the log-probs."""
    hidden = common.forward_hidden(critic, batch)  # (1, T, H)
    v = critic.score(hidden).squeeze(-1).float()  # (1, T): the value after reading each position
    v = torch.cat([v.new_zeros(1, 1), v[:, :-1]], 1).masked_fill(batch["position_ids"] == 0, 0.0)
    return common.completion_matrix(v, batch, width)


def partition(samples: list[dict], args: Args, step: int, epoch: int) -> list[list[tuple[list[int], dict]]]:
    """Minibatches of this rank's samples for one epoch, each a list of packed micro-batches (indices,
    batch). A sample's minibatch follows from its global index and a permutation seeded by (seed, step,
    epoch), so the minibatches hold the same answers on 1 rank or N."""
    g = torch.Generator().manual_seed(common.hash_int([args.seed, step, epoch]))
    perm = torch.randperm(args.prompts_per_step, generator=g)
    out = []
    for k in range(args.num_minibatches):
        mine = [i for i, s in enumerate(samples) if int(perm[s["gid"]]) % args.num_minibatches == k]
        out.append([([mine[j] for j in b], batch) for b, batch in common.packed_batches([samples[i] for i in mine], args.max_tokens)])
    return out


def rollout(policy, tokenizer, prompts, gids, seeds, args: Args, reward_model, step: int, device):
    """Sample one answer per prompt and score it (minus --missing-eos-penalty for an answer cut off before
    EOS). Returns (samples with their score, sums of their statistics on this rank, other statistics)."""
    t0 = time.time()
    gens = common.generate(policy, tokenizer, [p["prompt"] for p in prompts], args.max_new_tokens,
                           temperature=args.temperature, seeds=seeds)  # fmt: skip
    gen_s = time.time() - t0
    texts = [g["text"] for g in gens]
    ended = torch.tensor([g["ended"] for g in gens])
    raw = common.answer_scores(prompts, texts, reward_model, device, args.format_reward, args.max_tokens)
    scores = raw - args.missing_eos_penalty * (~ended).float()
    samples = [{**common.answer_sample(g), "gid": gid, "score": s} for g, gid, s in zip(gens, gids, scores.tolist())]
    sums = {  # this rank's; main() adds them over ranks
        "score": float(raw.sum()), "score_shaped": float(scores.sum()), "no_eos": float((~ended).sum()),
        "length": float(sum(len(g["completion_ids"]) for g in gens)), "answers": float(len(gens)),
    }  # fmt: skip
    if all("answer" in p for p in prompts):
        sums["correct"] = float(sum(common.rule_reward(t, p["answer"]) for p, t in zip(prompts, texts)))
    return samples, sums, {"distinct_2": common.distinct_2([g["completion_ids"] for g in gens]), "time/generation_s": gen_s}


@torch.no_grad()
def old_logps_and_values(policy, ref, critic, samples: list[dict], args: Args, step: int, device):
    """Old log-probs, reference log-probs and old values of every answer token, recorded in each sample
    and returned stacked (n, max_new_tokens), with the answer mask. They go through the micro-batches of
    the first minibatch pass: the same forward as the first update, so ρ = 1 exactly there."""
    w = args.max_new_tokens
    for minibatch in partition(samples, args, step, 0):
        for item in common.even_out(minibatch, policy):
            if item is None:  # --fsdp: this rank is out of micro-batches
                common.stand_in(policy, device)
                continue
            idx, batch = item
            batch = common.to_device(batch, device)
            with common.autocast(device):
                old, _ = common.answer_logps(policy, batch, w, args.temperature)
                ref_logp, _ = common.answer_logps(ref, batch, w, args.temperature)
                values = answer_values(critic, batch, w)
            mask = common.completion_matrix((batch["labels"] != common.IGNORE).float(), batch, w)
            for j, i in enumerate(idx):
                samples[i].update(old=old[j].cpu(), ref=ref_logp[j].cpu(), values=values[j].cpu(), mask=mask[j].cpu())
    stack = lambda key: torch.stack([s[key] for s in samples]) if samples else torch.zeros(0, w)  # noqa: E731
    return stack("old"), stack("ref"), stack("values"), stack("mask")


def value_stats(old: Tensor, ref_logp: Tensor, values: Tensor, returns: Tensor, mask: Tensor) -> dict:
    """This rank's token sums of the KL estimates and of the returns and value errors (main() adds them
    over ranks, for kl_k1, kl_k3 and the critic's explained variance)."""
    return {
        "kl_seq": float((common.kl_k1(old, ref_logp) * mask).sum()), "k3": float((common.kl_k3(old, ref_logp) * mask).sum()),
        "tokens": float(mask.sum()), "ret_sum": float((returns * mask).sum()), "ret_sq": float((returns**2 * mask).sum()),
        "err_sum": float(((returns - values) * mask).sum()), "err_sq": float(((returns - values) ** 2 * mask).sum()),
    }  # fmt: skip


@torch.no_grad()
def evaluate(policy, tokenizer, problems: list[dict], args: Args, reward_model, rank: int, world: int, device) -> dict:
    """Greedy answers to the held-out problems: accuracy, and the reward model's mean score when there is one."""
    mine = problems[rank::world]
    gens = common.generate(policy, tokenizer, [p["prompt"] for p in mine], args.max_new_tokens)
    texts = [g["text"] for g in gens]
    scored = reward_model is not None and mine
    rm_score = float(common.answer_scores(mine, texts, reward_model, device, max_tokens=args.max_tokens).sum()) if scored else 0.0
    right = sum(common.rule_reward(t, p["answer"]) for t, p in zip(texts, mine))
    total = common.sum_over_ranks({"right": right, "rm_score": rm_score})
    out = {"eval/accuracy": total["right"] / len(problems)}
    if reward_model is not None:
        out["eval/rm_score"] = total["rm_score"] / len(problems)
    return out


# ───────────── training ─────────────


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out_dir = common.start_run(args, "ppo", rank)
    if args.prompts_per_step % world:
        raise common.UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} ranks")
    if args.critic_init == "reward" and args.reward == "rule":
        raise common.UserError("--critic-init reward needs a reward model (--reward PATH); the rule has no backbone")

    tokenizer = common.load_tokenizer(args.model)
    policy = common.load_model(args.model, tokenizer, seed=args.seed, dropout=args.dropout).to(device)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    reward_model = None
    if args.reward != "rule":
        rm_tokenizer = common.load_tokenizer(args.reward)
        common.check_same_vocab(tokenizer, rm_tokenizer, f"--reward {args.reward}: its tokenizer differs from the policy's "
                                "({sizes}). Train the reward model from the policy's tokenizer (rm.py --model <the policy>).")  # fmt: skip
        reward_model = (common.load_reward_model(args.reward).requires_grad_(False).to(device), rm_tokenizer)
    critic = common.load_reward_model(args.reward).train() if args.critic_init == "reward" else value_model(policy, tokenizer)
    if not hasattr(critic, "score"):
        raise common.UserError(f"--critic-init reward: {args.reward} is a likelihood ORM, with no scalar head to start a critic from")
    critic = critic.to(device)

    builtin = args.data == "builtin"
    prompts = common.builtin_prompts("train", args.num_train, args.seed) if builtin else common.read_prompts(args.data, tokenizer)
    if reward_model is None and not all("answer" in p for p in prompts):
        missing = next(p for p in prompts if "answer" not in p)
        raise common.DataError(f"{missing['_where']}: missing field 'answer' (the rule reward needs it; or pass --reward PATH)")
    problems = common.builtin_task("test", args.num_eval, args.seed) if builtin else []

    policy = common.shard_model(policy, args.fsdp)  # after the reference and the critic copied it whole
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, fused=not common.sharded(policy))
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=0.0, fused=True)
    updates = args.ppo_epochs * args.num_minibatches
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps * updates, args.max_steps * updates)
    critic_sched = common.cosine_schedule(critic_opt, args.warmup_steps * updates, args.max_steps * updates)
    beta, start = args.beta, 0
    if args.resume:
        start, extra = common.load_checkpoint(out_dir, policy, optimizer, scheduler)
        for obj, key in ((critic, "critic"), (critic_opt, "critic_optimizer"), (critic_sched, "critic_scheduler")):
            obj.load_state_dict(extra[key])
        beta = extra["beta"]

    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("score", "kl", "accuracy"))
    if start == 0 and problems:
        log.log(0, evaluate(policy, tokenizer, problems, args, reward_model, rank, world, device))
    for step in range(start, args.max_steps):
        # 1. sample and score an answer per prompt: this rank's prompts (global index gid), seeded by (seed, step, prompt)
        order = common.step_indices(len(prompts), args.prompts_per_step, step, args.seed)
        gids = list(range(args.prompts_per_step))[rank::world]
        seeds = [common.hash_int([args.seed, step, order[g]]) for g in gids]
        samples, sums, local = rollout(policy, tokenizer, [prompts[order[g]] for g in gids], gids, seeds, args, reward_model,
                                       step, device)  # fmt: skip
        # 2. old log-probs, reference log-probs and old values of every answer token
        old, ref_logp, values, mask = old_logps_and_values(policy, ref, critic, samples, args, step, device)
        # 3. per-token rewards: −β·k1 on every answer token, the score added at the last
        rewards = shaped_rewards(torch.tensor([s["score"] for s in samples]), old, ref_logp, mask, beta)
        if args.whiten_rewards:
            rewards = common.masked_whiten(rewards, mask, shift_mean=False)
        # 4. GAE advantages and returns (the critic's regression targets)
        adv, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            adv = common.masked_whiten(adv, mask)
        for s, a, r in zip(samples, adv, returns):
            s["adv"], s["returns"] = a, r
        sums |= value_stats(old, ref_logp, values, returns, mask)
        t0 = time.time()
        # 5. PPO epochs over shuffled minibatches; each minibatch's loss is a mean over its valid tokens
        #    on all ranks, so every rank divides by the same count
        keys = ("pg_loss", "vf_loss", "entropy", "approx_kl", "clip_frac", "vf_clip_frac")
        diag, updates = common.Sums(*keys, "tokens"), 0  # token-weighted sums of ppo_loss's statistics
        for epoch in range(args.ppo_epochs):
            epoch_kl = common.Sums("approx_kl", "tokens")
            for minibatch in partition(samples, args, step, epoch):
                n_local = float(sum(samples[i]["mask"].sum() for idx, _ in minibatch for i in idx))
                n_tok = float(common.all_reduce_sum(torch.tensor(n_local)))
                for item in common.even_out(minibatch if n_tok else [], policy):
                    if item is None:  # --fsdp: this rank is out of micro-batches
                        common.stand_in(policy, device, backward=True)
                        continue
                    idx, batch = item
                    batch = common.to_device(batch, device)
                    in_batch = [samples[i] for i in idx]
                    old, old_values, returns, adv, mask = (torch.stack([s[k] for s in in_batch]).to(device)
                                                           for k in ("old", "values", "returns", "adv", "mask"))  # fmt: skip
                    with common.autocast(device):
                        logp, entropy = common.answer_logps(policy, batch, args.max_new_tokens, args.temperature, entropy=True)
                        values = answer_values(critic, batch, args.max_new_tokens)
                    loss, st = ppo_loss(logp, old, values, old_values, returns, adv, entropy, mask,
                                        args.clip_eps, args.vf_clip, args.vf_coef, args.ent_coef)  # fmt: skip
                    n = float(mask.sum())
                    (loss * n / n_tok).backward()  # the micro-batch's share of the minibatch's token mean
                    diag.add(**{k: st[k].item() * n for k in keys}, tokens=n)
                    epoch_kl.add(approx_kl=st["approx_kl"].item() * n, tokens=n)
                for model, opt, sched in ((policy, optimizer, scheduler), (critic, critic_opt, critic_sched)):
                    if n_tok:  # an empty minibatch (on every rank) only ticks the schedule
                        common.optimizer_step(model, opt, args.max_grad_norm, step)
                    sched.step()
                updates += bool(n_tok)
            epoch_kl = epoch_kl.total()
            if args.max_approx_kl and epoch_kl["approx_kl"] / max(epoch_kl["tokens"], 1.0) > args.max_approx_kl:
                for _ in range(args.num_minibatches * (args.ppo_epochs - epoch - 1)):  # keep the schedule on plan
                    scheduler.step()
                    critic_sched.step()
                break
        # 6. metrics over all ranks, then the KL controller
        tot, d = common.sum_over_ranks(sums), diag.total()
        tok, answers, n_tok = max(d["tokens"], 1.0), tot["answers"], max(tot["tokens"], 1.0)
        ret_var = tot["ret_sq"] / n_tok - (tot["ret_sum"] / n_tok) ** 2
        err_var = tot["err_sq"] / n_tok - (tot["err_sum"] / n_tok) ** 2
        kl = tot["kl_seq"] / answers
        metrics = {
            "loss": (d["pg_loss"] + args.vf_coef * d["vf_loss"] - args.ent_coef * d["entropy"]) / tok,
            **{k: d[k] / tok for k in keys},
            "score": tot["score"] / answers, "score_shaped": tot["score_shaped"] / answers, "kl": kl,
            "kl_k1": tot["kl_seq"] / n_tok, "kl_k3": tot["k3"] / n_tok, "beta": beta,
            "explained_var": 1 - err_var / ret_var if ret_var > 0 else float("nan"),
            "response_length": tot["length"] / answers, "no_eos_frac": tot["no_eos"] / answers, "updates": updates,
            **common.reduce_metrics(local, world), "lr": scheduler.get_last_lr()[0], "time/training_s": time.time() - t0,
        }  # fmt: skip
        if "correct" in tot:
            metrics["accuracy"] = tot["correct"] / answers
        if args.target_kl:
            beta = adaptive_beta(beta, kl, args.target_kl, int(answers), args.kl_horizon)
        log.log(step + 1, metrics)
        if problems and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            log.log(step + 1, evaluate(policy, tokenizer, problems, args, reward_model, rank, world, device))
        if args.save_every and (step + 1) % args.save_every == 0:
            extra = {"critic": critic.state_dict(), "critic_optimizer": critic_opt.state_dict(),
                     "critic_scheduler": critic_sched.state_dict(), "beta": beta}  # fmt: skip
            common.save_checkpoint(out_dir, step + 1, policy, optimizer, scheduler, rank, extra)

    if problems:
        log.log(args.max_steps, evaluate(policy, tokenizer, problems, args, reward_model, rank, world, device))
    if rank == 0:
        critic.save_pretrained(os.path.join(out_dir, "critic"))
    return common.finish_run(log, policy, tokenizer, out_dir, rank, args.keep_checkpoints)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
