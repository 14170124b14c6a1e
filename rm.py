"""Reward models: a Bradley-Terry outcome reward model (ORM), a process reward model (PRM), best-of-N.

ORM (the RM stage of InstructGPT, Ouyang et al. 2022, arXiv:2203.02155, eq. 1). A scalar head on
the backbone reads the hidden state of the last token of (prompt, response) and gives r(x, y). Under
the Bradley-Terry model P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), so the pairs are fitted by
    L = −log σ(r_w − r_l − m)
with m an optional per-pair margin from the data (a "margin" field: how much better y_w is; Llama 2,
Touvron et al. 2023, arXiv:2307.09288) and an optional centering term η·(r_w + r_l)² that pins the
free offset of r near 0 (Eisenstein et al. 2023, arXiv:2312.09244). The pairs come from the data, or
(--orm-pairs policy) from the policy's own answers to the training prompts, a right one preferred to a
wrong one: Cobbe et al.'s verifier data (2021, arXiv:2110.14168), which holds the mistakes this policy makes.
With --score likelihood the score is not a new head but the backbone's own language model, read at
every token of the answer: r(x, y) = β · (1/|y|) Σ_t log π(y_t | x, y_<t), SimPO's length-normalised
reward (Meng et al. 2024, arXiv:2405.14734, eq. 4), fitted by the same loss. Where a mistake shows as one
unlikely token (a wrong sum) this reads it where it is, instead of teaching a head at the last token to
carry it there. A PRM scored the same way (--kind prm --score likelihood) calls step t right while no
answer token up to it was unlikely: r_t = β · (min_{i ≤ t} log π(y_i | x, y_<i) − log p₀), the minimum over
the steps' own tokens (not the separators), trained by the same per-step cross-entropy.

PRM (Lightman et al. 2023, arXiv:2305.20050). The response is a list of steps, each
followed by --step-sep; the head reads the hidden state at every separator token and is trained with
binary cross-entropy against that step's label (labels nowhere else). Labels come from the data, or
(--prm-labels mc, Math-Shepherd, Wang et al. 2023, arXiv:2312.08935) from Monte Carlo rollouts:
    label(s_t) = (1/K) Σ_k 1[a completion sampled from s_1..s_t reaches the right answer]

Best-of-N (--best-of-n 4 16): sample N answers per held-out problem, keep the one the ORM scores
highest, or the one whose steps the PRM scores best by min_t r_t (Math-Shepherd) or by Π_t σ(r_t)
(Lightman et al.). Best-of-N weighted (Snell et al. 2024, arXiv:2408.03314): the answer whose samples'
weights sum highest, â = argmax_a Σ_{i: a_i = a} w_i, with w = 1 (majority vote), the ORM's exp(r) or the
PRM's σ(min_t r_t).

    torchrun --nproc_per_node 2 rm.py                                   # ORM on the built-in pairs
    python rm.py --score likelihood                                     # ORM: the LM's own likelihood
    python rm.py --score likelihood --orm-pairs policy --policy runs/sft  # ORM on the policy's own answers
    python rm.py --kind prm                                             # PRM on the built-in steps
    python rm.py --best-of-n 4 16 --policy runs/sft --orm runs/rm --prm runs/prm
"""

import json
import math
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from torch import Tensor

import common

ANSWERED_PROMPT = {"prompt": (str, list), "answer": (str, int, float)}  # a prompt file's fields (best-of-N, --orm-pairs policy)


@dataclass
class Args:
    """Reward modelling: Bradley-Terry ORM, process RM, and best-of-N with either."""

    # model and data
    model: str = common.DEFAULT_MODEL
    """backbone; its language-model head is replaced by a scalar head; "tiny" for tests"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    kind: Literal["orm", "prm"] = "orm"
    """orm: one score per response, from preference pairs; prm: one score per step"""
    data: str = "builtin"
    """preference JSONL (orm) or PRM JSONL (prm), or "builtin" for the arithmetic task"""
    eval_data: str = ""
    """held-out JSONL in the same format (the built-in task brings its own test split)"""
    num_train: int = 480
    """built-in training pairs / solutions (one epoch of the default run) / prompts (--orm-pairs policy)"""
    num_eval: int = 64
    """built-in held-out pairs / solutions / problems"""
    max_tokens: int = 2048
    """tokens per packed micro-batch (chosen and rejected of a pair always share one)"""
    share_prompt: bool = True
    """orm: a pair's prompt once in the packed row, both answers attending to it (common.collate_shared): exact, fewer tokens"""
    # algorithm
    score: Literal["head", "likelihood"] = "head"
    """head: a fresh scalar head (orm: at the answer's last token; prm: at each step end); likelihood: the
    backbone's own language-model head, every token read (orm: β × the answer's mean log-prob, SimPO's
    reward; prm: β × (the lowest token log-prob so far − log --min-prob)). A likelihood ORM trains at a gentler
    --lr than a fresh head (its default)"""
    beta: float = 2.0
    """--score likelihood: β, the scale of the score (SimPO's range, arXiv:2405.14734, is 2 to 2.5)"""
    min_prob: float = 0.05
    """--kind prm --score likelihood: p₀, a step scores wrong once a token of it or of an earlier step had
    probability under p₀ (0.05: the best of 0.5 ... 0.001 for the untrained 5-step SFT model on 256 built-in
    training solutions)"""
    center_coef: float = 0.0
    """η of the reward-centering term η·(r_w + r_l)² (arXiv:2312.09244 uses 0.01); 0: off"""
    step_sep: str = "\\n"
    """PRM: the text written after every step (\\n and \\t as typed: a line break, a tab); a step's score
    is read at its token"""
    orm_pairs: Literal["data", "policy"] = "data"
    """ORM pairs: the data's, or --policy's own answers to the training prompts (--policy-samples each), every
    right one (rule reward) preferred to every wrong one of its prompt: a verifier trained on the mistakes the policy
    makes, as Cobbe et al.'s is (arXiv:2110.14168, §4.2); a data file then needs "prompt" and "answer" """
    policy_samples: int = 8
    """answers sampled per training prompt for --orm-pairs policy"""
    prm_labels: Literal["data", "mc"] = "data"
    """PRM step labels: the data's, or Monte Carlo estimates from --policy rollouts (needs "answer")"""
    mc_samples: int = 4
    """K: completions sampled from each step prefix for --prm-labels mc"""
    # best-of-N (evaluation only, no training)
    best_of_n: tuple[int, ...] = ()
    """N values to evaluate best-of-N at on the held-out problems, e.g. 4 16; empty: train"""
    policy: str = ""
    """the policy that samples (best-of-N, MC labels); default: --model"""
    orm: str = ""
    """an ORM directory (this script's output) for best-of-N"""
    prm: str = ""
    """a PRM directory (this script's output with --kind prm) for best-of-N"""
    temperature: float = 1.0
    """sampling temperature of the policy"""
    max_new_tokens: int = 64
    """generation budget of the policy"""
    # optimisation
    lr: float | None = None
    """peak AdamW learning rate; default 3e-5, and 1e-5 for a likelihood ORM (--score likelihood, --kind orm),
    which moves a trained language model rather than a fresh head: on the built-in task 3e-5 lowered its held-out
    pairwise accuracy from its untrained 0.848 to 0.793, 1e-5 raised it to 0.902"""
    batch_size: int = 8
    """pairs (orm) or solutions (prm) per optimizer step, summed over ranks and micro-batches"""
    max_steps: int = 60
    """optimizer steps; 60 × 8 = one epoch of the default data"""
    warmup_steps: int = 3
    """linear warm-up steps before the cosine decay"""
    max_grad_norm: float = 10.0
    """gradient clipping threshold (global L2 norm)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    # run
    eval_every: int = 20
    """steps between held-out evaluations (also run before and after training); 0: only those"""
    save_every: int = 20
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    output_dir: str = ""
    """where the model, args.json and metrics.jsonl go; default runs/rm-<timestamp>"""
    seed: int = 0
    """seed for data order, sampling and the head's initialisation"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state across ranks (FSDP2) instead of replicating"""


# ───────────── losses and scores ─────────────


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None, center_coef: float = 0.0) -> Tensor:
    """Mean over pairs of −log σ(r_w − r_l − m) + η (r_w + r_l)²; all inputs (B,).

    Bradley-Terry: P(y_w ≻ y_l) = σ(r_w − r_l) (InstructGPT eq. 1). m: the pair's margin (Llama 2, arXiv:2307.09288),
    so a pair labelled "much better" must be won by more. η: reward centering (arXiv:2312.09244); BT
    sees only differences, so without it the mean reward drifts freely."""
    h = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(h)  # = log(1 + e^−h), finite for any h
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss.mean()


def prm_loss(step_logits: Tensor, step_labels: Tensor) -> Tensor:
    """Per-step binary cross-entropy, (S,) logits and labels in [0, 1] (1 = correct step) -> (S,).
    Soft labels (Monte Carlo fractions) are the targets of the same loss."""
    return F.binary_cross_entropy_with_logits(step_logits, step_labels, reduction="none")


def aggregate_steps(step_scores: Tensor, how: Literal["min", "product"]) -> Tensor:
    """PRM score of a whole solution from its steps' logits (T,): a weak step pulls it down.
        min:      min_t r_t
        product:  log Π_t σ(r_t) = Σ_t log σ(r_t)   (the log of the product: same argmax, no underflow)
    A solution with no steps scores −inf."""
    if step_scores.numel() == 0:
        return torch.tensor(float("-inf"))
    if how == "min":
        return step_scores.min()
    return F.logsigmoid(step_scores.double()).sum().to(step_scores.dtype)


def groups_of(x: Tensor, n: int) -> Tensor:
    """(P, M) -> (P, M // n, n): each problem's M samples as disjoint groups of n (a remainder is left out)."""
    p, m = x.shape
    return x[:, : m // n * n].reshape(p, m // n, n)


def best_of_n_accuracy(scores: Tensor, correct: Tensor, n: int) -> float:
    """scores, correct: (P, M) for M samples per problem. The M samples form M // n disjoint groups of n;
    in each group the highest-scoring sample is kept (the first on ties). Returns the mean correctness
    of the kept samples over problems and groups."""
    pick = groups_of(scores, n).argmax(-1, keepdim=True)  # (P, g, 1)
    return float(groups_of(correct, n).float().gather(-1, pick).mean())


NO_ANSWER = torch.iinfo(torch.int64).min  # in weighted_vote_pick's answers: the sample states no answer


def stated_answer_ids(texts: list[str]) -> list[int]:
    """Each text's stated answer (common.stated_answer) as a small id, equal ids for equal answers (any size of
    number fits a tensor); NO_ANSWER where none is stated."""
    ids: dict[int, int] = {}
    return [NO_ANSWER if (a := common.stated_answer(t)) is None else ids.setdefault(a, len(ids)) for t in texts]


def weighted_vote_pick(weights: Tensor, answers: Tensor, n: int) -> Tensor:
    """Best-of-N weighted (Snell et al., arXiv:2408.03314; Uesato et al.'s RM-weighted decoding, arXiv:2211.14275).
    weights (P, M) ≥ 0, answers (P, M) each sample's stated answer (stated_answer_ids), NO_ANSWER where it states
    none. The M samples form M // n disjoint groups of n; in each group the weights are summed over the samples that
    state the same answer, and the answer with the largest sum is kept:
        â = argmax_a  Σ_{i : a_i = a} w_i
    Weights 1 give majority vote (self-consistency, Wang et al., arXiv:2203.11171). A sample with no answer is never
    kept while another in its group states one. Returns (P, M // n, 1): in each group, the index of the first sample
    stating the kept answer (the answer stated first wins a tie)."""
    w, a = groups_of(weights, n), groups_of(answers, n)
    same = a[..., :, None] == a[..., None, :]  # (P, g, n, n): sample j states the answer of sample i
    total = (same * w[..., None, :]).sum(-1).masked_fill(a == NO_ANSWER, float("-inf"))  # (P, g, n): its answer's sum
    return total.argmax(-1, keepdim=True)  # the first of the maximal ones


def weighted_vote_accuracy(weights: Tensor, answers: Tensor, correct: Tensor, n: int) -> float:
    """The mean correctness of the answers weighted_vote_pick keeps, over problems and groups (as best_of_n_accuracy)."""
    return float(groups_of(correct, n).float().gather(-1, weighted_vote_pick(weights, answers, n)).mean())


def vote_weights(scores: dict[str, Tensor], shape: torch.Size) -> dict[str, Tensor]:
    """The weights weighted_vote_pick sums, (P, M) each: "vote" all 1 (majority vote); for each ORM ("orm...") among
    the scorers, "<key>_vote" its Bradley-Terry strengths exp(r); for the PRM's min aggregate, "prm_vote" its
    probability σ(min_t r_t) that the weakest step is right. exp(r) is taken as a softmax over a problem's samples:
    that scales all of them by one factor, so every vote is the same, and exp cannot overflow."""
    weights = {"vote": torch.ones(shape)}
    for key, s in scores.items():
        if key.startswith("orm"):
            weights[f"{key}_vote"] = s.softmax(-1)
    if "prm_min" in scores:
        weights["prm_vote"] = scores["prm_min"].sigmoid()
    return weights


_STEP_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_steps(text: str) -> list[str]:
    """A response cut into steps: at line breaks and after sentence ends ("8 - 3 = 5. The answer is 5."
    has two steps). Numbers like 3.5 do not split, as the period is not followed by a space."""
    return [s.strip() for s in _STEP_END.split(text.strip()) if s.strip()]


# ───────────── models ─────────────


def reward_model(name: str, tokenizer, kind: str, seed: int, dropout: bool = False, beta: float | None = None,
                 min_prob: float = 0.05):
    """The backbone of `name` with a fresh scalar head (num_labels=1) in a standard transformers class:
    sequence classification for the ORM (transformers reads it at the last non-pad token, as here), token
    classification for the PRM. The LM head is dropped; the new head starts near 0, N(0, 1/(H+1)).
    With `beta` (--score likelihood) the model is the causal LM itself, marked in its config as an ORM
    whose score is β × the answer's mean log-prob (common.reward_scores reads the mark) or a PRM whose
    step scores are likelihood_step_logits."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    lm = common.load_model(name, tokenizer, seed=seed, dropout=dropout)
    if beta is not None:
        lm.config.reward_score, lm.config.reward_beta = "likelihood" if kind == "orm" else "likelihood_steps", beta
        if kind == "prm":
            lm.config.reward_min_prob = min_prob
        return lm
    config = lm.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    cls = AutoModelForSequenceClassification if kind == "orm" else AutoModelForTokenClassification
    model = cls.from_config(config, dtype=torch.float32)
    model.get_decoder().load_state_dict(lm.get_decoder().state_dict())
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(config.hidden_size + 1))
    if model.score.bias is not None:
        torch.nn.init.zeros_(model.score.bias)
    model.set_attn_implementation(common.ATTN_IMPL)
    if not dropout:
        common.disable_dropout(model)
    return model


def set_scoring_pad(tokenizer) -> None:
    """transformers' sequence classifier scores the last token that is not padding. Where the pad token
    is also the token a sample ends with (pad = eos = <|eot_id|> and a Llama-3 template), it would read
    one token early and score what rm.py never trained: give the tokenizer, and so the saved model, a
    pad token that ends nothing (its unk or another unused special token)."""
    eot = common.end_of_turn_token(tokenizer)
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot) if eot else None}
    if tokenizer.pad_token_id not in ends:
        return
    avoid = ends | {tokenizer.bos_token_id}
    spare = [t for t in [tokenizer.unk_token, *tokenizer.all_special_tokens, *tokenizer.get_added_vocab()]
             if t and tokenizer.convert_tokens_to_ids(t) not in avoid]  # fmt: skip
    if not spare:
        raise common.UserError(f"the pad token {tokenizer.pad_token!r} ends every sample and the tokenizer has no other special "
                         "token to pad with: transformers would score the wrong token of this reward model")  # fmt: skip
    print(f"pad token {tokenizer.pad_token!r} ends samples; padding with {spare[0]!r}, so that transformers' sequence "
          "classifier scores the same token as rm.py", flush=True)  # fmt: skip
    tokenizer.pad_token = spare[0]


def pair_rewards(model, batch: dict) -> tuple[Tensor, Tensor]:
    """r(x, y) of the chosen and rejected documents of a packed row (chosen_0, rejected_0, chosen_1, ...):
    the head applied to the last token of each document, or β × its mean log-prob (--score likelihood).
    (n,), (n,) in float32."""
    r = common.reward_scores(model, batch).view(-1, 2)  # (2n,) -> (n, 2)
    return r[:, 0], r[:, 1]


def likelihood_step_logits(model, batch: dict) -> Tensor:
    """A likelihood PRM's score at every position of a packed row, (1, T): β · (min over the answer's tokens
    so far of log π(y_i | x, y_<i) − log p₀), each document on its own; separator tokens (step_labels ≥ 0)
    are layout the policy may never write, so they do not count."""
    logp, _ = common.token_logps(model, batch)  # (1, T)
    counted = (batch["labels"] != common.IGNORE) & (batch["step_labels"] < 0)
    logp = logp.masked_fill(~counted, 0.0)[0]  # log 1: leaves a minimum as it is
    cu = batch["cu_seqlens"].tolist()
    lowest = torch.cat([logp[a:b].cummin(0).values for a, b in zip(cu, cu[1:])])
    return (model.config.reward_beta * (lowest - math.log(model.config.reward_min_prob)))[None]


def step_logits(model, batch: dict) -> tuple[Tensor, Tensor]:
    """PRM logits and labels at every step end of the batch: (S,), (S,). step_labels is −1 elsewhere."""
    at = batch["step_labels"] >= 0
    if getattr(model.config, "reward_score", None) == "likelihood_steps":
        return likelihood_step_logits(model, batch)[at].float(), batch["step_labels"][at].float()
    hidden = common.forward_hidden(model, batch)  # (1, T, H)
    return model.score(hidden[at]).squeeze(-1).float(), batch["step_labels"][at].float()


# ───────────── data ─────────────


def tokenize_pairs(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], dict]:
    """Preference rows -> pairs of tokenized (prompt, answer) conversations with their margin (0 when the
    row has none). Skips (and counts) identical answers, empty answers and pairs over max_tokens."""
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
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise common.DataError(f"{row.get('_where', 'builtin')}: field 'margin' must be a finite number")
        docs = [common.tokenize_conversation(tokenizer, prompt + a, len(prompt), row.get("_where")) for a in answers]
        if sum(len(d["input_ids"]) for d in docs) > max_tokens:
            skipped["too_long"] += 1
            continue
        pairs.append({"chosen": docs[0], "rejected": docs[1], "margin": float(margin)})
    return pairs, skipped


def tokenize_steps(tokenizer, prompt, steps: list[str], labels: list, sep: str) -> dict:
    """(prompt, steps) -> {"input_ids", "labels", "step_labels"}: the answer is Σ (step + sep); step_labels
    holds each step's label at the token holding the first character of its separator, −1 elsewhere."""
    content = "".join(s + sep for s in steps)
    text, spans = common.assistant_spans(tokenizer, common.as_messages(prompt, content))
    start = spans[-1][0]
    if text[start : start + len(content)] != content:
        raise common.UserError(f"the chat template rewrites the answer, so the step separator {sep!r} cannot be located")
    sample = common.tokenize_conversation(tokenizer, common.as_messages(prompt, content))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    step_labels, at = [-1.0] * len(offsets), start
    for step, label in zip(steps, labels):
        at += len(step)  # the separator's first character
        tok = next(i for i, (a, b) in enumerate(offsets) if a <= at < b)
        step_labels[tok] = float(label)
        at += len(sep)
    return {**sample, "step_labels": step_labels}


def prm_samples(rows: list[dict], tokenizer, sep: str, max_tokens: int) -> tuple[list[dict], dict]:
    """PRM rows -> tokenized solutions. Skips (and counts) rows without steps, with an empty step, and
    rows over max_tokens."""
    out, skipped = [], {"empty": 0, "too_long": 0}
    for row in rows:
        if not row["completions"] or any(not s.strip() for s in row["completions"]):
            skipped["empty"] += 1
            continue
        with common.template_errors(row.get("_where")):
            sample = tokenize_steps(tokenizer, row["prompt"], row["completions"], row["labels"], sep)
        if len(sample["input_ids"]) > max_tokens:
            skipped["too_long"] += 1
            continue
        out.append(sample)
    return out, skipped


def micro_batches(samples: list[dict], kind: str, max_tokens: int, share: bool = True) -> list[tuple[list[int], dict]]:
    """Packed rows of at most max_tokens: (sample indices, batch). A pair's chosen and rejected are
    adjacent documents of one row, their prompt once (share) or in both."""
    if kind == "orm":
        return common.group_batches([[p["chosen"], p["rejected"]] for p in samples], max_tokens, share)
    lengths = [len(s["input_ids"]) for s in samples]
    return [
        (b, common.collate_packed([samples[i] for i in b], extra=("step_labels",)))
        for b in common.pack_bins(lengths, max_tokens)
    ]


@torch.no_grad()
def mc_step_labels(policy, tokenizer, rows: list[dict], k: int, max_new_tokens: int, temperature: float) -> list[dict]:
    """Math-Shepherd labels: from each step prefix s_1..s_t (steps joined by spaces, as the policy
    writes them), sample k completions; the label is the fraction whose answer is right."""
    prefixes = [(r, t) for r in rows for t in range(len(r["completions"]))]
    prefill = [" ".join(r["completions"][: t + 1]) + " " for r, t in prefixes]
    gens = common.generate(policy, tokenizer, [r["prompt"] for r, _ in prefixes for _ in range(k)], max_new_tokens,
                           temperature=temperature, prefill=[p for p in prefill for _ in range(k)],
                           what="Monte Carlo step labels")  # fmt: skip
    hits = [common.rule_reward(prefill[i // k] + g["text"], prefixes[i // k][0]["answer"]) for i, g in enumerate(gens)]
    out, j = [], 0
    for r in rows:
        n = len(r["completions"])
        out.append({**r, "labels": [sum(hits[(j + t) * k : (j + t + 1) * k]) / k for t in range(n)]})
        j += n
    return out


# ───────────── evaluation and best-of-N ─────────────


@torch.no_grad()
def evaluate(model, samples: list[dict], kind: str, max_tokens: int, rank: int, world: int, device, share: bool = True) -> dict:
    """ORM: held-out pairwise accuracy (r_w > r_l) and mean margin. PRM: step accuracy (σ(r) > ½ where the
    label is > ½) and solution accuracy (min_t r_t > 0 exactly when every step is right)."""
    model.eval()
    sums = common.Sums("right", "margin", "pairs") if kind == "orm" else common.Sums("right_steps", "steps", "right_solutions", "solutions")
    mine = samples[rank::world]
    for _, batch in common.progress(micro_batches(mine, kind, max_tokens, share) if mine else [], "held-out rewards"):
        batch = common.to_device(batch, device)
        with common.autocast(device):
            if kind == "orm":
                r_w, r_l = pair_rewards(model, batch)
                sums.add(right=(r_w > r_l).sum().item(), margin=(r_w - r_l).sum().item(), pairs=len(r_w))
                continue
            logits, labels = step_logits(model, batch)
        doc = common.doc_ids(batch)[batch["step_labels"] >= 0]  # the solution each step belongs to
        n = int(doc.max()) + 1
        worst = torch.full((n,), float("inf"), device=logits.device).scatter_reduce(0, doc, logits, "amin")
        all_right = torch.ones(n, device=logits.device).scatter_reduce(0, doc, (labels > 0.5).float(), "amin")
        right_steps, right_solutions = ((logits > 0) == (labels > 0.5)).sum(), ((worst > 0) == (all_right > 0)).sum()
        sums.add(right_steps=right_steps.item(), steps=len(logits), right_solutions=right_solutions.item(), solutions=n)
    model.train()
    s = sums.total()
    if kind == "orm":
        return {"eval/accuracy": s["right"] / s["pairs"], "eval/margin": s["margin"] / s["pairs"]} if s["pairs"] else {}
    if not s["steps"]:
        return {}  # nothing held out: no metric rather than a 0 measured on nothing
    return {"eval/step_accuracy": s["right_steps"] / s["steps"], "eval/solution_accuracy": s["right_solutions"] / s["solutions"]}


@torch.no_grad()
def score_responses(
    model, tokenizer, kind: str, prompts: list, texts: list[str], sep: str, max_tokens: int, device
) -> list[Tensor]:
    """Per response: the ORM's score, (1,), or the PRM's step logits, (T,); empty for an empty response."""
    docs, out = {}, [torch.empty(0) for _ in texts]
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        steps = split_steps(text)
        if steps and kind == "prm":
            docs[i] = tokenize_steps(tokenizer, prompt, steps, [0.0] * len(steps), sep)
        elif steps:
            docs[i] = common.tokenize_conversation(tokenizer, common.as_messages(prompt, text))
    keys = list(docs)
    for b in common.pack_bins([len(docs[k]["input_ids"]) for k in keys], max_tokens):
        batch = common.collate_packed([docs[keys[i]] for i in b], extra=("step_labels",) if kind == "prm" else ())
        batch = common.to_device(batch, device)
        with common.autocast(device):
            if kind == "orm":
                scores = common.reward_scores(model, batch).cpu()[:, None]  # (n, 1)
                for j, i in enumerate(b):
                    out[keys[i]] = scores[j]
                continue
            logits, _ = step_logits(model, batch)
        doc = common.doc_ids(batch)[batch["step_labels"] >= 0].cpu()
        for j, i in enumerate(b):
            out[keys[i]] = logits.cpu()[doc == j]
    return out


def load_policy(args: Args, device):
    """The model that samples (best-of-N, Monte Carlo labels, --orm-pairs policy): --policy, else --model; and its tokenizer."""
    name = args.policy or args.model
    tokenizer = common.load_tokenizer(name)
    return common.load_model(name, tokenizer, seed=args.seed).to(device), tokenizer


def run_best_of_n(args: Args, out_dir: str, rank: int, world: int, device) -> dict:
    """Sample max(N) answers per held-out problem once; for each N, the accuracy of the answer each
    scorer keeps, averaged over the disjoint groups of N. Also: greedy, one sample (N = 1) and pass@N
    (some answer in the group is right: the ceiling of any scorer). Every sample, its correctness and
    its scores go to best_of_n_samples.jsonl, to see what a scorer prefers."""
    policy, tokenizer = load_policy(args, device)
    if args.data == "builtin":
        problems = common.builtin_prompts("test", args.num_eval, args.seed)
    else:
        problems = common.read_jsonl(args.eval_data or args.data, ANSWERED_PROMPT)
    mine, m = problems[rank::world], max(args.best_of_n)
    t0 = time.time()
    greedy = common.generate(policy, tokenizer, [p["prompt"] for p in mine], args.max_new_tokens, what="best-of-N: greedy")
    samples = common.generate(policy, tokenizer, [p["prompt"] for p in mine for _ in range(m)], args.max_new_tokens,
                              temperature=args.temperature, what=f"best-of-N: {m} samples per prompt")  # fmt: skip
    gen_s = time.time() - t0
    del policy
    prompts, texts = [p["prompt"] for p in mine for _ in range(m)], [g["text"] for g in samples]
    correct = torch.tensor([common.rule_reward(t, mine[i // m]["answer"]) for i, t in enumerate(texts)]).view(-1, m)
    scores = {}  # scorer -> (P, m)
    for kind, path in (("orm", args.orm), ("prm", args.prm)):
        if not path:
            continue
        rm_tok = common.load_tokenizer(path)
        per = score_responses(
            common.load_reward_model(path, kind).to(device), rm_tok, kind, prompts, texts, step_separator(args), args.max_tokens, device
        )
        ways = ["min", "product"] if kind == "prm" else ["score"]
        for how in ways:
            agg = [
                (s[0] if s.numel() else torch.tensor(float("-inf"))) if kind == "orm" else aggregate_steps(s, how) for s in per
            ]
            scores[kind if kind == "orm" else f"prm_{how}"] = torch.stack(agg).float().view(-1, m)
    answers = torch.tensor(stated_answer_ids(texts), dtype=torch.long).view(-1, m)
    weights = vote_weights(scores, answers.shape)
    n_local = float(len(mine))
    local = {
        "greedy": sum(common.rule_reward(g["text"], p["answer"]) for g, p in zip(greedy, mine)),
        "sample": float(correct.sum()) / m,
    }
    for n in args.best_of_n:
        local[f"pass@{n}"] = n_local * best_of_n_accuracy(correct.float(), correct, n) if mine else 0.0  # an oracle scorer
        for key, sc in scores.items():
            local[f"{key}@{n}"] = n_local * best_of_n_accuracy(sc, correct, n) if mine else 0.0
        for key, w in weights.items():
            local[f"{key}@{n}"] = n_local * weighted_vote_accuracy(w, answers, correct, n) if mine else 0.0
    keys = sorted(local)
    total = common.all_reduce_sum(torch.tensor([local[k] for k in keys], dtype=torch.float64)) / len(problems)
    result = {f"bon/{k}": v for k, v in zip(keys, total.tolist())}
    result["bon/generation_s"] = gen_s
    rows = [{"prompt": prompts[i], "answer": mine[i // m]["answer"], "text": t, "correct": float(correct.view(-1)[i]),
             **{k: float(v.view(-1)[i]) for k, v in scores.items()}} for i, t in enumerate(texts)]  # fmt: skip
    rows = common.all_gather_objects(rows)
    if rank == 0:
        with open(os.path.join(out_dir, "best_of_n_samples.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(out_dir, "best_of_n.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
    return result


# ───────────── training ─────────────


def load_data(args: Args, tokenizer, split: str, rank: int, world: int, device, out_dir: str) -> list[dict]:
    """Tokenized pairs (orm) or solutions (prm) of a split; skips are counted and printed."""
    path = args.data if split == "train" else args.eval_data
    builtin = args.data == "builtin"
    n = args.num_train if split == "train" else args.num_eval
    if not builtin and not path:
        return []
    if args.kind == "orm" and split == "train" and args.orm_pairs == "policy":
        prompts = common.builtin_prompts(split, n, args.seed) if builtin else common.read_jsonl(path, ANSWERED_PROMPT)
        samples, skipped = tokenize_pairs(policy_pairs(prompts, args, rank, world, device, out_dir), tokenizer, args.max_tokens)
    elif args.kind == "orm":
        rows = common.builtin_preferences(split, n, args.seed) if builtin else common.read_preferences(path)
        samples, skipped = tokenize_pairs(rows, tokenizer, args.max_tokens)
    else:
        rows = common.builtin_prm(split, n, args.seed) if builtin else common.read_prm(path)
        if split == "train" and args.prm_labels == "mc":
            rows = mc_labelled(rows, args, rank, world, device, out_dir)
        samples, skipped = prm_samples(rows, tokenizer, step_separator(args), args.max_tokens)
    if rank == 0:
        print(f"{split}: {len(samples)} {'pairs' if args.kind == 'orm' else 'solutions'}; skipped: {skipped}")
    return samples


@torch.no_grad()
def policy_pairs(rows: list[dict], args: Args, rank: int, world: int, device, out_dir: str) -> list[dict]:
    """Preference rows from --policy's own answers: K samples per prompt (each rank its share, kept in
    out_dir/policy_samples.jsonl under the policy's weights, the prompts and the sampling arguments, so --resume
    reuses them), labelled by the rule reward; each prompt gives every (right, wrong) pair of its samples, and a
    prompt whose K answers are all right or all wrong gives none (counted)."""
    policy, tokenizer = load_policy(args, device)
    k = args.policy_samples

    def make():
        mine = rows[rank::world]
        gens = common.generate(policy, tokenizer, [r["prompt"] for r in mine for _ in range(k)], args.max_new_tokens,
                               temperature=args.temperature, what=f"ORM pairs: {k} answers per prompt")  # fmt: skip
        return common.gather_shares([{"texts": [g["text"] for g in gens[i * k : (i + 1) * k]]} for i in range(len(mine))],
                                    len(rows), world)  # fmt: skip

    key = common.cache_key(common.weights_fingerprint(policy), [r["prompt"] for r in rows], k, args.max_new_tokens,
                           args.temperature, args.seed)  # fmt: skip
    samples = common.cached_jsonl(os.path.join(out_dir, "policy_samples.jsonl"), make, rank, key)
    pairs, counts = [], {"all_right": 0, "all_wrong": 0, "right_answers": 0}
    for r, s in zip(rows, samples):
        ok = [common.rule_reward(t, r["answer"]) > 0 for t in s["texts"]]
        right, wrong = [t for t, y in zip(s["texts"], ok) if y], [t for t, y in zip(s["texts"], ok) if not y]
        counts["all_right"] += not wrong
        counts["all_wrong"] += not right
        counts["right_answers"] += len(right)
        where = r.get("_where", "builtin")
        pairs += [{"prompt": r["prompt"], "chosen": c, "rejected": w, "_where": where} for c in right for w in wrong]
    if rank == 0:
        print(f"ORM pairs from the policy: {len(pairs)} from {len(rows)} prompts × {k} answers "
              f"({counts['right_answers'] / (len(rows) * k):.3f} right); prompts with no pair: {counts['all_right']} "
              f"all right, {counts['all_wrong']} all wrong")  # fmt: skip
    return pairs


def mc_labelled(rows: list[dict], args: Args, rank: int, world: int, device, out_dir: str) -> list[dict]:
    """The rows with Monte Carlo step labels from --policy, computed once (split across ranks) and kept
    in out_dir/mc_labels.jsonl, a PRM file that --resume and later runs reuse."""
    path = os.path.join(out_dir, "mc_labels.jsonl")
    for r in rows:
        if "answer" not in r:
            raise common.DataError(f"{r.get('_where', 'builtin')}: missing field 'answer' (needed by --prm-labels mc)")
    policy, tokenizer = load_policy(args, device)
    key = common.cache_key(common.weights_fingerprint(policy), [{k: v for k, v in r.items() if k != "_where"} for r in rows],
                           common.training_args(args))  # the policy's weights, not its path  # fmt: skip
    if common.cached(path, key, "Monte Carlo step labels", rank):
        return common.read_prm(path)
    mine = mc_step_labels(policy, tokenizer, rows[rank::world], args.mc_samples, args.max_new_tokens, args.temperature)
    labelled = common.gather_shares(mine, len(rows), world)
    exact = [x > 0.5 for r in rows for x in r["labels"]]
    mc = [x > 0.5 for r in labelled for x in r["labels"]]
    if rank == 0:
        print(f"MC labels agree with the data's labels on {sum(a == b for a, b in zip(exact, mc)) / len(mc):.3f} of the steps")
        common.write_cached(path, key, lambda tmp: open(tmp, "w").writelines(
            json.dumps({k: v for k, v in r.items() if k != "_where"}) + "\n" for r in labelled))  # fmt: skip
    return labelled


def step_separator(args: Args) -> str:
    """--step-sep as typed on a command line ("\\n") -> the text it stands for (a line break)."""
    return args.step_sep.replace("\\n", "\n").replace("\\t", "\t")


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    if args.lr is None:  # args.json shows the rate used
        args = replace(args, lr=1e-5 if args.kind == "orm" and args.score == "likelihood" else 3e-5)
    if args.orm_pairs == "policy" and (args.kind != "orm" or args.policy_samples < 2):
        raise common.UserError("--orm-pairs policy trains an ORM (--kind orm) from at least 2 answers a prompt (--policy-samples)")
    out_dir = common.start_run(args, "rm", rank)
    if args.best_of_n:
        run_best_of_n(args, out_dir, rank, world, device)
        return out_dir

    tokenizer = common.load_tokenizer(args.model)
    if args.kind == "orm" and args.score == "head":
        set_scoring_pad(tokenizer)
    train = load_data(args, tokenizer, "train", rank, world, device, out_dir)
    held_out = load_data(args, tokenizer, "test", rank, world, device, out_dir)
    if not train:
        raise common.UserError(f"{args.data}: no usable training samples")
    beta = args.beta if args.score == "likelihood" else None
    model = reward_model(args.model, tokenizer, args.kind, args.seed, args.dropout, beta, args.min_prob).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = common.shard_model(model, args.fsdp)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=not common.sharded(model))
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps, args.max_steps)
    start = common.load_checkpoint(out_dir, model, optimizer, scheduler)[0] if args.resume else 0

    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("loss", "accuracy"))
    if start == 0:
        log.log(0, evaluate(model, held_out, args.kind, args.max_tokens, rank, world, device, args.share_prompt))
    for step in range(start, args.max_steps):
        t0 = time.time()
        # 1. this rank's share of the step; the loss is divided by the pairs (orm) or steps (prm) of the
        #    whole step over all micro-batches and ranks, so the split changes nothing
        mine = [train[i] for i in common.step_indices(len(train), args.batch_size, step, args.seed)[rank::world]]
        units = len(mine) if args.kind == "orm" else sum(sum(x >= 0 for x in s["step_labels"]) for s in mine)
        total = common.all_reduce_sum(torch.tensor(float(units)))
        names = ("rewards/margins", "rewards/chosen", "rewards/rejected") if args.kind == "orm" else ("scores/mean_prob",)
        sums, tokens = common.Sums("loss", "accuracy", *names), 0  # summed over pairs (orm) or steps (prm)
        for local, batch in micro_batches(mine, args.kind, args.max_tokens, args.share_prompt):
            batch = common.to_device(batch, device)
            with common.autocast(device):
                # 2. rewards of chosen and rejected from one packed forward, and the Bradley-Terry loss
                if args.kind == "orm":
                    r_w, r_l = pair_rewards(model, batch)
                    margin = torch.tensor([mine[i]["margin"] for i in local], device=r_w.device)
                    loss = bradley_terry_loss(r_w, r_l, margin, args.center_coef) * len(local)  # the micro-batch's sum
                    stats = {"accuracy": (r_w > r_l).float(), "rewards/margins": r_w - r_l, "rewards/chosen": r_w,
                             "rewards/rejected": r_l}  # fmt: skip
                # 2'. step scores at every separator and their cross-entropy
                else:
                    logits, labels = step_logits(model, batch)
                    loss = prm_loss(logits, labels).sum()
                    stats = {"accuracy": ((logits > 0) == (labels > 0.5)).float(), "scores/mean_prob": torch.sigmoid(logits)}
            (loss / total.to(device)).backward()
            sums.add(loss=loss.detach(), **{k: v.detach() for k, v in stats.items()})
            tokens += common.num_tokens(batch)
        common.check_finite(torch.tensor(sums["loss"], dtype=torch.float64), "the loss", step)
        # 3. sum gradients over ranks, clip, step
        grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, step)
        scheduler.step()

        metrics = {k: v / float(total) for k, v in sums.total().items()}  # means over the step's pairs or steps
        metrics |= {"grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": float(common.all_reduce_sum(torch.tensor(float(tokens)))) / (time.time() - t0)}  # fmt: skip
        log.log(step + 1, metrics)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            log.log(step + 1, evaluate(model, held_out, args.kind, args.max_tokens, rank, world, device, args.share_prompt))
        if args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(out_dir, step + 1, model, optimizer, scheduler, rank)

    log.log(args.max_steps, evaluate(model, held_out, args.kind, args.max_tokens, rank, world, device, args.share_prompt))
    load = f"common.load_reward_model({{!r}}, kind={args.kind!r})  # cleanpost's common.py"
    return common.finish_run(log, model, tokenizer, out_dir, rank, args.keep_checkpoints, load)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
