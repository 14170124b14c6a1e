"""Supervised fine-tuning (SFT) with an assistant-only loss, on packed rows: the first stage of the
InstructGPT recipe, Ouyang et al. 2022, arXiv:2203.02155.

Trains log π(y|x) up on demonstrations: only assistant tokens (and their end-of-turn token) carry a
loss, every system and user token is masked (TRL's assistant_only_loss). With A the assistant tokens of a batch:
    token    normalisation:  L = −(1/|A|) Σ_{t∈A} log π(x_t | x_<t)
    sequence normalisation:  L = −(1/N) Σ_n (1/|A_n|) Σ_{t∈A_n} log π(x_t | x_<t)
Samples are packed best-fit-decreasing into rows of --max-tokens; attention stays inside each
sample (packing without cross-contamination, Krell et al. 2021, arXiv:2107.02027). The denominators are those of the whole optimizer step (all micro-batches and
ranks), so 4 micro-batches of 1 give exactly the loss and gradient of 1 batch of 4.

    torchrun --nproc_per_node 2 sft.py
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch import Tensor

import common


@dataclass
class Args:
    """Supervised fine-tuning with an assistant-only loss."""

    # model and data
    model: str = common.DEFAULT_MODEL
    """Hugging Face id or local directory; the default is served from the embedded GGUF; "tiny" for tests"""
    dropout: bool = False
    """keep the model's dropout while training (off by default, as in TRL: a random mask makes π differ from itself)"""
    data: str = "builtin"
    """JSONL with "messages" or "prompt"/"completion", or "builtin" for the arithmetic task"""
    eval_data: str = ""
    """held-out JSONL in the same format (the built-in task brings its own test split)"""
    num_train: int = 2000
    """samples of the built-in task to train on"""
    num_eval: int = 64
    """held-out built-in problems for the eval loss and greedy accuracy"""
    max_tokens: int = 2048
    """tokens per packed micro-batch: the memory knob; micro-batches per step follow from it"""
    overlong: Literal["drop", "truncate"] = "drop"
    """what to do with a sample longer than --max-tokens (counted in the log either way)"""
    packing: bool = True
    """pack samples into rows; --no-packing pads each micro-batch instead"""
    # algorithm
    loss_normalization: Literal["token", "sequence"] = "token"
    """"token": every assistant token weighs the same (TRL's default); "sequence": every sample does"""
    # optimisation
    lr: float = 1e-4
    """peak AdamW learning rate"""
    batch_size: int = 8
    """samples per optimizer step, summed over ranks and micro-batches"""
    max_steps: int = 40
    """optimizer steps"""
    warmup_steps: int = 4
    """linear warm-up steps before the cosine decay"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    # run
    eval_every: int = 0
    """steps between evaluations; 0: evaluate only before and after training"""
    save_every: int = 20
    """steps between resumable checkpoints; 0: none"""
    keep_checkpoints: bool = False
    """keep the checkpoints after the final save (by default they go: the saved model is the result)"""
    max_new_tokens: int = 64
    """generation budget for greedy-accuracy evaluation"""
    output_dir: str = ""
    """where the model, args.json and metrics.jsonl go; default runs/sft-<timestamp>"""
    seed: int = 0
    """seed for data order and initialisation"""
    resume: bool = False
    """continue from the last checkpoint in --output-dir"""
    overwrite: bool = False
    """start over in a used --output-dir (removes that run's checkpoints, metrics and caches)"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state across ranks (FSDP2) instead of replicating"""


def sft_loss(logp: Tensor, mask: Tensor, normalize: str = "token", doc: Tensor = None, num_units=None) -> Tensor:
    """Negative log-likelihood of the masked tokens. logp, mask: (B, T); doc: (B, T) index of the
    sample each token belongs to (packed rows), default one sample per row.

    token:    −Σ_{t∈A} logp_t / num_units,               num_units = |A| by default
    sequence: −Σ_n (Σ_{t∈A_n} logp_t / |A_n|) / num_units, num_units = N samples with a label by default
    Pass the whole optimizer step's num_units when the step is split into micro-batches or ranks.
    """
    mask = mask.to(logp.dtype)
    if normalize == "token":
        denom = mask.sum() if num_units is None else num_units
        return -(logp * mask).sum() / denom
    doc = torch.arange(logp.shape[0], device=logp.device).unsqueeze(1).expand_as(logp) if doc is None else doc
    n_docs = int(doc.max()) + 1
    nll = torch.zeros(n_docs, dtype=logp.dtype, device=logp.device).index_add(0, doc.flatten(), -(logp * mask).flatten())
    count = torch.zeros(n_docs, dtype=logp.dtype, device=logp.device).index_add(0, doc.flatten(), mask.flatten())
    has_label = count > 0
    denom = has_label.sum() if num_units is None else num_units
    return (nll[has_label] / count[has_label]).sum() / denom


def load_samples(path: str, tokenizer, max_tokens: int, overlong: str, split: str, n: int, seed: int):
    """Tokenised, masked samples, the number over max_tokens and the number without a trainable token."""
    if path == "builtin":
        samples = [common.tokenize_conversation(tokenizer, c) for c in common.builtin_sft(split, n, seed)]
    else:
        samples = [common.tokenize_conversation(tokenizer, r["messages"], where=r["_where"]) for r in common.read_sft(path)]
    return common.fit_length(samples, max_tokens, overlong)


def micro_batches(samples: list[dict], max_tokens: int, packing: bool, pad_id: int) -> list[dict]:
    """Split one rank's share of a step into micro-batches of at most max_tokens tokens each."""
    if packing:
        bins = common.pack_bins([len(s["input_ids"]) for s in samples], max_tokens)
        return [common.collate_packed([samples[i] for i in b]) for b in bins]
    groups, width = [[]], 0
    for s in samples:
        width = max(width, len(s["input_ids"]))
        if groups[-1] and (len(groups[-1]) + 1) * width > max_tokens:
            groups.append([])
            width = len(s["input_ids"])
        groups[-1].append(s)
    return [common.collate_padded(g, pad_id) for g in groups if g]


def units(batch: dict, normalize: str) -> int:
    """What the loss is averaged over in this micro-batch: labelled tokens, or samples."""
    if normalize == "token":
        return int((batch["labels"] != common.IGNORE).sum())
    return int(common.doc_ids(batch).max()) + 1


@torch.no_grad()
def evaluate(model, tokenizer, eval_samples, problems, args, rank, world, device) -> dict:
    """Held-out token-level NLL (every rank scores its share) and greedy accuracy on the task."""
    if not eval_samples and not problems:
        return {}
    model.eval()
    mine = eval_samples[rank::world]
    nll, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for batch in common.progress(micro_batches(mine, args.max_tokens, True, tokenizer.pad_token_id) if mine else [], "held-out loss"):
        batch = common.to_device(batch, device)
        with common.autocast(device):
            logp, _ = common.token_logps(model, batch)
        mask = batch["labels"] != common.IGNORE
        nll -= logp[mask].double().sum().cpu()
        count += mask.sum().cpu()
    out = {"eval/loss": float(common.all_reduce_sum(nll) / common.all_reduce_sum(count).clamp(min=1))}
    if problems:
        out["eval/accuracy"] = common.greedy_accuracy(model, tokenizer, problems, args.max_new_tokens, rank, world)
    model.train()
    return out


def main(args: Args) -> str:
    rank, world, device = common.init_distributed()
    common.seed_everything(args.seed)
    out_dir = common.start_run(args, "sft", rank)

    tokenizer = common.load_tokenizer(args.model)
    model = common.load_model(args.model, tokenizer, seed=args.seed, dropout=args.dropout).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = common.shard_model(model, args.fsdp)
    model.train()

    train, overlong, untrainable = load_samples(args.data, tokenizer, args.max_tokens, args.overlong, "train", args.num_train, args.seed)
    eval_path = args.eval_data or ("builtin" if args.data == "builtin" else "")
    eval_samples = load_samples(eval_path, tokenizer, args.max_tokens, "drop", "test", args.num_eval, args.seed)[0] if eval_path else []
    problems = common.builtin_task("test", args.num_eval, args.seed) if args.data == "builtin" else []
    if rank == 0:
        print(f"{len(train)} training samples; {overlong} over {args.max_tokens} tokens ({'dropped' if args.overlong == 'drop' else 'truncated'}), {untrainable} without a trainable token (skipped)")
    if not train:
        raise common.UserError(f"{args.data}: no trainable samples left")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=not common.sharded(model))
    scheduler = common.cosine_schedule(optimizer, args.warmup_steps, args.max_steps)
    start = common.load_checkpoint(out_dir, model, optimizer, scheduler)[0] if args.resume else 0

    log = common.MetricsLog(out_dir, args.max_steps, start, rank, keys=("loss", "tokens_per_s"))
    if start == 0:
        log.log(0, evaluate(model, tokenizer, eval_samples, problems, args, rank, world, device))
    for step in range(start, args.max_steps):
        t0 = time.time()
        # 1. this rank's share of the step's samples, in micro-batches of <= max_tokens tokens
        idx = common.step_indices(len(train), args.batch_size, step, args.seed)
        batches = micro_batches([train[i] for i in idx[rank::world]], args.max_tokens, args.packing, tokenizer.pad_token_id)
        # 2. the step's denominator over all micro-batches and ranks: accumulation changes nothing
        num_units = common.all_reduce_sum(torch.tensor(float(sum(units(b, args.loss_normalization) for b in batches))))
        loss_sum, tokens = torch.zeros(()), 0
        for batch in common.even_out(batches, model):
            if batch is None:  # --fsdp: this rank is out of micro-batches
                common.stand_in(model, device, backward=True)
                continue
            batch = common.to_device(batch, device)
            with common.autocast(device):
                logp, _ = common.token_logps(model, batch)
            mask = batch["labels"] != common.IGNORE
            loss = sft_loss(logp, mask, args.loss_normalization, common.doc_ids(batch), num_units.to(device))
            loss.backward()
            loss_sum += loss.detach().cpu()
            tokens += common.num_tokens(batch)
        common.check_finite(loss_sum, "the loss", step)
        # 3. sum gradients over ranks, clip, step
        grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, step)
        scheduler.step()

        metrics = {
            "loss": float(common.all_reduce_sum(loss_sum)),
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": float(common.all_reduce_sum(torch.tensor(float(tokens)))) / (time.time() - t0),
            "micro_batches": len(batches),
        }
        log.log(step + 1, metrics)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            log.log(step + 1, evaluate(model, tokenizer, eval_samples, problems, args, rank, world, device))
        if args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(out_dir, step + 1, model, optimizer, scheduler, rank)

    log.log(args.max_steps, evaluate(model, tokenizer, eval_samples, problems, args, rank, world, device))
    return common.finish_run(log, model, tokenizer, out_dir, rank, args.keep_checkpoints)


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args, default=common.resume_defaults(Args)))
