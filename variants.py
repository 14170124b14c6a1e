"""DPO variants: IPO, KTO, ORPO, SimPO. Read dpo.py first; each loss changes one thing:

    loss   paired?  π_ref?  loss of a pair / an example                         fixes, in DPO
    DPO    yes      yes     −log σ(β(ρ_w − ρ_l))                                (the baseline)
    IPO    yes      yes     (ρ_w − ρ_l − 1/(2τ))²                               KL stops holding when preferences
                                                                                are certain; rewards drift unbounded
    KTO    no       yes     λ_y (1 − σ(±β(ρ − z_ref)))                          needs pairs; loss ≠ utility
    ORPO   yes      no      NLL(y_w) − λ log σ(log odds_w − log odds_l)         two stages (SFT, then DPO) and
                                                                                a frozen reference in memory
    SimPO  yes      no      −log σ(β avg_w − β avg_l − γ)                       length bias, displacement, π_ref
with the log-ratio ρ = log π(y|x) − log π_ref(y|x) summed over the answer's tokens, avg = log π(y|x) / |y| and
odds = p / (1 − p), p = exp(avg). ORPO and SimPO never load a reference model: their memory is one model.
Papers: DPO arXiv:2305.18290; IPO Azar et al. arXiv:2310.12036; KTO Ethayarajh et al. arXiv:2402.01306;
ORPO Hong et al. arXiv:2403.07691; SimPO Meng et al. arXiv:2405.14734.

    torchrun --nproc_per_node 2 variants.py --loss kto
"""

import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from torch import Tensor

import common


@dataclass
class Args:
    """Preference tuning with a DPO variant: IPO, KTO, ORPO or SimPO."""

    # model and data
    model: str = common.DEFAULT_MODEL
    """policy to train, and the reference of IPO / KTO; "tiny" for tests"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    loss: Literal["ipo", "kto", "orpo", "simpo"] = "ipo"
    """which variant to train with"""
    data: str = "builtin"
    """JSONL with prompt/chosen/rejected (KTO: prompt/completion/label, or pairs split in two), or "builtin" """
    eval_data: str = ""
    """held-out preference JSONL (the built-in task brings its own test split)"""
    num_train: int = 240
    """built-in training pairs (KTO: unpaired examples)"""
    num_eval: int = 64
    """built-in held-out pairs and problems"""
    max_tokens: int = 2048
    """tokens per packed micro-batch"""
    share_prompt: bool = True
    """a unit's common prompt once in the packed row, its documents attending to it (common.collate_shared): exact, fewer tokens"""
    # algorithm
    tau: float = 0.1
    """IPO τ: the log-ratio margin is regressed onto 1/(2τ)"""
    kto_beta: float = 0.1
    """KTO β, as DPO's"""
    lambda_d: float = 1.0
    """KTO λ_D, weight of desirable examples"""
    lambda_u: float = 1.0
    """KTO λ_U, weight of undesirable examples; keep λ_D n_D / (λ_U n_U) in [1, 4/3] (paper, §4.2)"""
    orpo_lambda: float = 0.1
    """ORPO λ: weight of the odds-ratio term next to the chosen NLL"""
    simpo_beta: float = 2.0
    """SimPO β: scale of the length-normalised reward"""
    simpo_gamma: float = 1.0
    """SimPO γ: target reward margin (γ/β = 0.5, in the paper's recommended range)"""
    # optimisation
    lr: float = 5e-6
    """peak AdamW learning rate"""
    batch_size: int = 8
    """pairs (KTO: examples) per optimizer step, summed over ranks and micro-batches"""
    max_steps: int = 30
    """optimizer steps"""
    warmup_steps: int = 3
    """linear warm-up steps before the cosine decay"""
    max_grad_norm: float = 10.0
    """gradient clipping threshold (global L2 norm)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    # run
    eval_every: int = 0
    """steps between evaluations; 0: evaluate only before and after training"""
    save_every: int = 10
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    max_new_tokens: int = 64
    """generation budget of the greedy-accuracy evaluation"""
    output_dir: str = ""
    """where the model, args.json and metrics.jsonl go; default runs/<loss>-<timestamp>"""
    seed: int = 0
    """seed for data order and the KTO mismatched pairs"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state across ranks (FSDP2) instead of replicating"""


# ───────────── the losses ─────────────


def ipo_loss(
    pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """Per-pair IPO loss, (B,) inputs: summed sequence log-probs. Returns (loss, h), both (B,).

    h = (pi_w − ref_w) − (pi_l − ref_l),   loss = (h − 1/(2τ))²      eq. 17 of arXiv:2310.12036

    The log-ratios are summed over tokens, as h_π is written in the paper (log π(y|x) of the whole
    answer). TRL averages them per token instead (following a remark of the authors), which makes the
    target 1/(2τ) a per-token margin: with summed log-ratios the same τ asks for a smaller pull."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return (h - 1 / (2 * tau)) ** 2, h.detach()


def kto_loss(
    logratio: Tensor, desirable: Tensor, kl: Tensor, beta: float, lambda_d: float, lambda_u: float
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-example KTO loss (arXiv:2402.01306, eq. 8). logratio (B,): log π(y|x) − log π_ref(y|x) summed
    over the answer; desirable (B,) bool; kl: the scalar baseline z_ref. Returns (loss, reward β·logratio).

        v = σ(β (logratio − z_ref))  if y is desirable          a gain over the reference point
        v = σ(β (z_ref − logratio))  if y is undesirable        a loss below it
        loss = λ_y (1 − v)

    z_ref = max(0, mean log-ratio of mismatched (x, y') pairs) is detached here: no gradient through it."""
    z = kl.detach().clamp(min=0)
    v = torch.where(desirable, torch.sigmoid(beta * (logratio - z)), torch.sigmoid(beta * (z - logratio)))
    weight = torch.where(desirable, torch.full_like(v, lambda_d), torch.full_like(v, lambda_u))
    return weight * (1 - v), beta * logratio.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012): log(−expm1(x)) near 0, log1p(−eˣ)
    far below. x is clamped just under 0, where p = eˣ → 1 would make it −inf."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg_logp: Tensor, rejected_avg_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair odds-ratio term of ORPO (arXiv:2403.07691, eq. 6-7), inputs (B,): the mean log-prob per answer
    token, so p = exp(avg) is the geometric mean token probability. Returns (loss, log odds ratio), (B,).

        log odds(y) = log p − log(1 − p) = avg − log1mexp(avg)
        loss        = −log σ(log odds_w − log odds_l)
    The script adds the NLL of the chosen answer: L = NLL(y_w) + λ · loss. No reference model."""
    log_odds = lambda a: a - log1mexp(a)
    ratio = log_odds(chosen_avg_logp) - log_odds(rejected_avg_logp)
    return -F.logsigmoid(ratio), ratio.detach()


def simpo_loss(chosen_avg_logp: Tensor, rejected_avg_logp: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair SimPO loss (arXiv:2405.14734, eq. 6), inputs (B,): mean log-prob per answer token.
    Returns (loss, r_w, r_l) with the length-normalised rewards r = β · avg.

        loss = −log σ(β avg_w − β avg_l − γ)        no reference model; γ: the target margin"""
    r_w, r_l = beta * chosen_avg_logp, beta * rejected_avg_logp
    return -F.logsigmoid(r_w - r_l - gamma), r_w.detach(), r_l.detach()


def mismatched_partners(n: int, seed: int) -> list[int]:
    """KTO's KL pairs: example i is scored with the answer of example partners[i], never its own (n ≥ 2).
    The partner is the next example in a seeded shuffle, so it is fixed for the run, whatever the batch
    size or split: odd batches and a batch of one get a mismatched answer too, and the reference log-probs
    of the mismatched pairs are computed once, like the matched ones."""
    if n < 2:
        raise common.UserError("KTO's KL baseline needs at least 2 examples, to pair a prompt with another's answer")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partners = [0] * n
    for k, i in enumerate(order):
        partners[i] = order[(k + 1) % n]
    return partners


# ───────────── data: pairs, or unpaired examples with their mismatched answer ─────────────


def tokenize_pairs(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], dict]:
    """Preference rows -> {"chosen", "rejected"} tokenized samples whose labels cover only the answer.
    Skips (and counts) identical answers, empty answers and pairs over max_tokens."""
    pairs, skipped = [], {"identical": 0, "empty": 0, "too_long": 0}
    for row in rows:
        prompt = common.as_messages(row["prompt"])
        answers = [common.as_messages(row["prompt"], row[k])[len(prompt) :] for k in ("chosen", "rejected")]
        if answers[0] == answers[1]:
            skipped["identical"] += 1
            continue
        if any(not "".join(m["content"] for m in a).strip() for a in answers):
            skipped["empty"] += 1
            continue
        chosen, rejected = (common.tokenize_conversation(tokenizer, prompt + a, len(prompt), row.get("_where")) for a in answers)
        if len(chosen["input_ids"]) + len(rejected["input_ids"]) > max_tokens:
            skipped["too_long"] += 1
            continue
        pairs.append({"chosen": chosen, "rejected": rejected})
    return pairs, skipped


def read_unpaired(path: str) -> list[dict]:
    """KTO rows {"prompt", "completion", "label"}; a preference file is split, each pair giving one
    desirable (chosen) and one undesirable (rejected) example."""
    rows = common.read_jsonl(path, {})
    if all("chosen" in r for r in rows):
        rows = common.read_preferences(path)
        return [
            {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows for k in ("chosen", "rejected")
        ]
    return common.read_unpaired(path)


def tokenize_unpaired(rows: list[dict], tokenizer, max_tokens: int, seed: int) -> tuple[list[dict], dict]:
    """KTO rows -> {"completion", "mismatch", "desirable"}: the example, and its prompt with the answer of its
    mismatched partner (for z_ref). Skips (and counts) empty answers and examples over max_tokens."""
    kept, skipped = [], {"empty": 0, "too_long": 0}
    for row in rows:
        answer = common.as_messages(row["prompt"], row["completion"])[len(common.as_messages(row["prompt"])) :]
        if not "".join(m["content"] for m in answer).strip():
            skipped["empty"] += 1
            continue
        kept.append((common.as_messages(row["prompt"]), answer, bool(row["label"]), row.get("_where")))
    partners = mismatched_partners(len(kept), seed)
    out = []
    for (prompt, answer, label, where), j in zip(kept, partners):
        doc = common.tokenize_conversation(tokenizer, prompt + answer, len(prompt), where)
        mismatch = common.tokenize_conversation(tokenizer, prompt + kept[j][1], len(prompt), where)
        if len(doc["input_ids"]) + len(mismatch["input_ids"]) > max_tokens:
            skipped["too_long"] += 1
            continue
        out.append({"completion": doc, "mismatch": mismatch, "desirable": label})
    return out, skipped


def check_kto_balance(examples: list[dict], lambda_d: float, lambda_u: float, rank: int) -> None:
    """Both classes must be present; warn when λ_D n_D / (λ_U n_U) leaves [1, 4/3] (arXiv:2402.01306, §4.2)."""
    n_d = sum(e["desirable"] for e in examples)
    n_u = len(examples) - n_d
    if n_d == 0 or n_u == 0:
        raise common.UserError(f"KTO needs desirable and undesirable examples; the data has {n_d} desirable and {n_u} undesirable")
    ratio = lambda_d * n_d / (lambda_u * n_u)
    if rank == 0 and not 1 <= ratio <= 4 / 3:
        print(
            f"warning: λ_D n_D / (λ_U n_U) = {ratio:.2f} is outside the paper's [1, 4/3]; e.g. --lambda-u {lambda_d * n_d / n_u:.3f}"
        )


def unit_batches(units: list[dict], keys: tuple[str, ...], max_tokens: int, share: bool = True) -> list[tuple[list[int], dict]]:
    """Pack units into micro-batches: (unit indices, packed row of the documents `keys` of each unit, in order),
    with the documents' common prompt once (share) or in each."""
    return common.group_batches([[u[k] for k in keys] for u in units], max_tokens, share)


def doc_logps(model, batch: dict, width: int) -> tuple[Tensor, Tensor]:
    """Summed answer log-probs and answer lengths of the packed documents, each (n, width): one row per unit."""
    logp, _ = common.token_logps(model, batch)
    seq = common.sequence_logps(logp, batch)
    lengths = common.sequence_logps(torch.ones_like(logp), batch)
    return seq.view(-1, width), lengths.view(-1, width)


@torch.no_grad()
def unit_logps(model, units: list[dict], keys: tuple[str, ...], max_tokens: int, device, share: bool = True) -> Tensor:
    """(n, len(keys), 2) summed log-probs and answer lengths of each unit's documents, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(units), len(keys), 2, dtype=torch.float64)
    for idx, batch in common.progress(unit_batches(units, keys, max_tokens, share) if units else [], "log-probs"):
        with common.autocast(device):
            seq, lengths = doc_logps(model, common.to_device(batch, device), len(keys))
        out[idx] = torch.stack([seq, lengths], -1).double().cpu()
    model.train(was_training)
    return out


def all_logps(model, units: list[dict], keys: tuple[str, ...], max_tokens: int, rank: int, world: int, device,
              share: bool = True) -> Tensor:  # fmt: skip
    """unit_logps of every unit, (N, len(keys), 2): one pass split across ranks."""
    out = torch.zeros(len(units), len(keys), 2, dtype=torch.float64)
    mine = list(range(rank, len(units), world))
    out[mine] = unit_logps(model, [units[i] for i in mine], keys, max_tokens, device, share)
    return common.all_reduce_sum(out).float()


# ───────────── evaluation ─────────────


def pair_rewards(args: Args, seq: Tensor, lengths: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Each variant's own reward of the chosen and rejected answers, (n, 2) inputs: summed log-ratios
    (IPO, KTO), log odds (ORPO), length-normalised log-probs (SimPO)."""
    if args.loss in ("ipo", "kto"):
        r = seq - ref
    elif args.loss == "orpo":
        avg = seq / lengths
        r = avg - log1mexp(avg)
    else:
        r = args.simpo_beta * seq / lengths
    return r[:, 0], r[:, 1]


@torch.no_grad()
def evaluate(model, tokenizer, eval_pairs, start_logps, problems, args, rank, world, device) -> dict:
    """Held-out preference accuracy by the variant's own reward, the drift of the chosen and rejected
    log-probs from the starting model (no reference model needed: `start_logps` is the policy before
    training), and greedy task accuracy."""
    model.eval()
    out = {}
    if eval_pairs:
        pi = all_logps(model, eval_pairs, ("chosen", "rejected"), args.max_tokens, rank, world, device, args.share_prompt)
        r_w, r_l = pair_rewards(args, pi[..., 0], pi[..., 1], start_logps[..., 0])
        out["eval/rewards/accuracies"] = float((r_w > r_l).float().mean())
        out["eval/logps/chosen_drift"] = float((pi[:, 0, 0] - start_logps[:, 0, 0]).mean())
        out["eval/logps/rejected_drift"] = float((pi[:, 1, 0] - start_logps[:, 1, 0]).mean())
    if problems:
        out["eval/accuracy"] = common.greedy_accuracy(model, tokenizer, problems, args.max_new_tokens, rank, world)
    model.train()
    return out


# ───────────── training ─────────────


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out_dir = common.start_run(args, args.loss, rank)

    tokenizer = common.load_tokenizer(args.model)
    policy = common.load_model(args.model, tokenizer, seed=args.seed, dropout=args.dropout).to(device)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # data: pairs, or for KTO unpaired examples, each with the mismatched answer its z_ref term scores
    builtin = args.data == "builtin"
    if args.loss == "kto":
        rows = common.builtin_unpaired("train", args.num_train, args.seed) if builtin else read_unpaired(args.data)
        train, skipped = tokenize_unpaired(rows, tokenizer, args.max_tokens, args.seed)
        check_kto_balance(train, args.lambda_d, args.lambda_u, rank)
        keys = ("completion", "mismatch")
    else:
        rows = common.builtin_preferences("train", args.num_train, args.seed) if builtin else common.read_preferences(args.data)
        train, skipped = tokenize_pairs(rows, tokenizer, args.max_tokens)
        keys = ("chosen", "rejected")
    if rank == 0:
        print(f"{len(train)} training examples; skipped: {skipped}")
    if not train:
        raise common.UserError(f"{args.data}: no usable training examples ({skipped})")
    eval_rows = common.builtin_preferences("test", args.num_eval, args.seed) if builtin else (
        common.read_preferences(args.eval_data) if args.eval_data else [])  # fmt: skip
    eval_pairs = tokenize_pairs(eval_rows, tokenizer, args.max_tokens)[0]
    problems = common.builtin_task("test", args.num_eval, args.seed) if builtin else []

    # the starting policy scores everything once: π_ref of IPO / KTO (no reference model kept in memory)
    # and the start point of the held-out drift; ORPO and SimPO never need a reference for training
    start_logps = (
        all_logps(policy, eval_pairs, ("chosen", "rejected"), args.max_tokens, rank, world, device, args.share_prompt) if eval_pairs else None
    )
    ref = all_logps(policy, train, keys, args.max_tokens, rank, world, device, args.share_prompt)[..., 0] if args.loss in ("ipo", "kto") else None

    policy = common.shard_model(policy, args.fsdp)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, fused=not common.sharded(policy))
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps, args.max_steps)
    start = common.load_checkpoint(out_dir, policy, optimizer, scheduler)[0] if args.resume else 0

    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("loss", "rewards/accuracies"))
    if start == 0:
        log.log(0, evaluate(policy, tokenizer, eval_pairs, start_logps, problems, args, rank, world, device))
    for step in range(start, args.max_steps):
        t0 = time.time()
        idx = common.step_indices(len(train), args.batch_size, step, args.seed)[rank::world]
        mine = [train[i] for i in idx]
        n_global = common.all_reduce_sum(torch.tensor(float(len(idx))))
        # 1. KTO: the step's KL baseline z_ref = max(0, mean log-ratio of the mismatched pairs), no gradient;
        #    one estimate over the whole step (all micro-batches and ranks), as TRL gathers it across processes
        kl = torch.zeros((), device=device)
        if args.loss == "kto":
            mismatch = unit_logps(policy, mine, ("mismatch",), args.max_tokens, device, args.share_prompt)[:, 0, 0]  # (n,), this rank's
            kl = (common.all_reduce_sum((mismatch - ref[idx, 1]).sum().double()) / n_global).clamp(min=0).float().to(device)
        sums = {}
        tokens = 0
        trained = keys[:1] if args.loss == "kto" else keys  # KTO's mismatched answers only feed z_ref (step 1)
        for local, batch in unit_batches(mine, trained, args.max_tokens, args.share_prompt):
            batch = common.to_device(batch, device)
            rows = [idx[i] for i in local]
            with common.autocast(device):
                seq, lengths = doc_logps(policy, batch, len(trained))  # (n, 2) or KTO (n, 1): summed log-probs, lengths
            # 2. the variant's loss, per pair / example
            stats = {"logps/chosen": seq[:, 0].detach(), "logps/rejected": seq[:, -1].detach()}
            if args.loss == "ipo":
                ref_w, ref_l = ref[rows].to(device).unbind(1)
                loss, _ = ipo_loss(seq[:, 0], seq[:, 1], ref_w, ref_l, args.tau)
                stats.update({"rewards/chosen": seq[:, 0].detach() - ref_w, "rewards/rejected": seq[:, 1].detach() - ref_l})
            elif args.loss == "kto":
                desirable = torch.tensor([mine[i]["desirable"] for i in local], device=device)
                loss, reward = kto_loss(
                    seq[:, 0] - ref[rows, 0].to(device), desirable, kl, args.kto_beta, args.lambda_d, args.lambda_u
                )
                stats = {"rewards/desirable_sum": reward * desirable, "rewards/undesirable_sum": reward * ~desirable,
                         "count/desirable": desirable.float(), "count/undesirable": (~desirable).float()}  # fmt: skip
            elif args.loss == "orpo":
                avg = seq / lengths  # mean log-prob per answer token
                odds_loss, log_odds_ratio = orpo_loss(avg[:, 0], avg[:, 1])
                nll = -avg[:, 0]  # the SFT term on the chosen answer
                loss = nll + args.orpo_lambda * odds_loss
                stats.update({"nll": nll.detach(), "log_odds_ratio": log_odds_ratio, "rewards/chosen": avg[:, 0].detach(),
                              "rewards/rejected": avg[:, 1].detach()})  # fmt: skip
            else:
                avg = seq / lengths
                loss, r_w, r_l = simpo_loss(avg[:, 0], avg[:, 1], args.simpo_beta, args.simpo_gamma)
                stats.update({"rewards/chosen": r_w, "rewards/rejected": r_l})
            # divided by the step's example count over all micro-batches and ranks
            (loss.sum() / n_global.to(device)).backward()
            stats["loss"] = loss.detach()
            if "rewards/chosen" in stats:
                stats["rewards/accuracies"] = (stats["rewards/chosen"] > stats["rewards/rejected"]).float()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.double().sum().cpu()
            tokens += common.num_tokens(batch)
        common.check_finite(sums["loss"], "the loss", step)
        # 3. sum gradients over ranks, clip, step
        grad_norm = common.optimizer_step(policy, optimizer, args.max_grad_norm, step)
        scheduler.step()

        names = sorted(sums)
        total = dict(zip(names, common.all_reduce_sum(torch.stack([sums[k] for k in names])).tolist()))
        metrics = {
            k: v / float(n_global)
            for k, v in total.items()
            if not k.startswith(("count/", "rewards/desirable", "rewards/undesirable"))
        }
        if args.loss == "kto":
            metrics["rewards/desirable"] = total["rewards/desirable_sum"] / max(total["count/desirable"], 1)
            metrics["rewards/undesirable"] = total["rewards/undesirable_sum"] / max(total["count/undesirable"], 1)
            metrics["kl"] = float(kl)
        if "rewards/chosen" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics.update({"grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": float(common.all_reduce_sum(torch.tensor(float(tokens)))) / (time.time() - t0)})  # fmt: skip
        log.log(step + 1, metrics)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            log.log(step + 1, evaluate(policy, tokenizer, eval_pairs, start_logps, problems, args, rank, world, device))
        if args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(out_dir, step + 1, policy, optimizer, scheduler, rank)

    log.log(args.max_steps, evaluate(policy, tokenizer, eval_pairs, start_logps, problems, args, rank, world, device))
    return common.finish_run(log, policy, tokenizer, out_dir, rank, args.keep_checkpoints)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
