"""Model merging on safetensors checkpoints, streamed tensor by tensor.

    linear (WiSE-FT, Wortsman et al. 2022, arXiv:2109.01903):  θ = (1 − α) θ_aligned + α θ_base
    slerp:            along the great circle between the two weight vectors of each tensor
    task-arithmetic (Ilharco et al. 2023, arXiv:2212.04089):   θ = θ_base + Σ_i λ_i (θ_i − θ_base)
    ties (Yadav et al. 2023, arXiv:2306.01708): per task vector τ_i = θ_i − θ_base keep the top
          --density of |τ_i|, elect each coordinate's sign by the summed mass, and average only the
          τ_i that agree with it (disjoint mean): θ = θ_base + λ τ_merged
    dare (Yu et al. 2024, arXiv:2311.03099): drop each coordinate of τ_i with probability p and
          rescale the rest by 1/(1 − p) (the expected τ_i is unchanged), then task arithmetic;
          dare-ties: the same drop, then TIES

Only one tensor of each input is in memory at a time, and the output is written shard by shard, so
peak memory stays near one output shard whatever the model size. Inputs must be safetensors (a
single file or a sharded index); pickle checkpoints (.bin, .pt) are refused, never loaded. The output
directory appears complete or not at all (written to a temporary directory, then renamed).

    python merge.py --method ties --models a b c --base base --out merged
    python merge.py --method linear --models runs/sft-default --base HuggingFaceTB/SmolLM2-135M-Instruct --sweep 0 0.25 0.5 0.75 1
"""

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

import common


@dataclass
class Args:
    """Merge checkpoints: linear / WiSE-FT, SLERP, task arithmetic, TIES, DARE."""

    method: Literal["linear", "slerp", "task-arithmetic", "ties", "dare", "dare-ties"] = "linear"
    """how to combine the models"""
    models: list[str] = field(default_factory=list)
    """required: the fine-tuned / aligned checkpoints (linear and slerp take one)"""
    base: str = common.DEFAULT_MODEL
    """the base checkpoint the others were fine-tuned from"""
    out: str = ""
    """output directory; default runs/merge-<method>-<timestamp>"""
    overwrite: bool = False
    """replace --out even if it holds files merge.py did not write"""
    alpha: float = 0.5
    """linear: weight of the base, θ = (1 − α) θ_aligned + α θ_base; slerp: the same t along the arc"""
    weights: list[float] = field(default_factory=list)
    """λ_i of each model's task vector (task-arithmetic, ties, dare); default 1 each"""
    density: float = 0.2
    """TIES: fraction of each task vector's coordinates kept (largest magnitudes)"""
    drop_p: float = 0.9
    """DARE: probability of dropping a task-vector coordinate"""
    seed: int = 0
    """seed of DARE's drop masks (per tensor and model, so the result is independent of order)"""
    shard_mb: int = 2000
    """maximum size of an output shard in MB (peak memory stays near this)"""
    # the alignment-tax curve
    sweep: list[float] = field(default_factory=list)
    """linear only: evaluate these α on the built-in task and on held-out prose, write a table and a plot"""
    num_eval: int = 64
    """built-in held-out problems of the sweep's greedy accuracy"""
    max_new_tokens: int = 64
    """generation budget of the sweep's greedy accuracy"""


# ───────────── merging tensors ─────────────


def linear(aligned: Tensor, base: Tensor, alpha: float) -> Tensor:
    """(1 − α) aligned + α base; α = 0 and α = 1 return the inputs exactly."""
    if alpha == 0:
        return aligned.clone()
    if alpha == 1:
        return base.clone()
    return torch.lerp(aligned.float(), base.float(), alpha)


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-6) -> Tensor:
    """Spherical interpolation of two tensors as flat vectors, t ∈ [0, 1]:
        Ω = arccos(â·b̂),   slerp = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b
    Equal-norm inputs give an output of the same norm. When a and b are nearly parallel (|â·b̂| > 1 − eps)
    sin Ω → 0 and the arc is linear interpolation, which it falls back to; nearly anti-parallel inputs
    have no unique great circle either, and fall back to linear interpolation as well (mergekit does the
    same), which passes near zero at t = ½."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    x, y = a.double().flatten(), b.double().flatten()
    dot = (x / x.norm().clamp(min=1e-12)) @ (y / y.norm().clamp(min=1e-12))
    if abs(dot) > 1 - eps:
        return torch.lerp(a.float(), b.float(), t)
    omega = torch.arccos(dot.clamp(-1, 1))
    out = (torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)
    return out.view_as(a).float()


def trim(delta: Tensor, density: float) -> Tensor:
    """TIES step 1: keep the `density` fraction of coordinates with the largest |δ|, zero the rest."""
    k = math.ceil(density * delta.numel())
    if k >= delta.numel():
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values  # the k-th largest |δ|
    return delta * (delta.abs() >= threshold)


def ties(deltas: list[Tensor], density: float, weights: list[float]) -> Tensor:
    """TIES-merging of task vectors (arXiv:2306.01708, Algorithm 1): trim each to `density`, elect each
    coordinate's sign as that of Σ_i λ_i τ̂_i (the summed mass), and average the τ̂_i whose sign agrees
    (zeros do not count). Returns the merged task vector (the caller scales and adds it to θ_base)."""
    trimmed = torch.stack([w * trim(d.float(), density) for d, w in zip(deltas, weights)])  # (M, ...)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(delta: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """DARE (arXiv:2311.03099): drop each coordinate with probability p, rescale survivors by 1/(1 − p),
    so E[dare(δ)] = δ."""
    if p == 0:
        return delta.float()
    keep = torch.rand(delta.shape, generator=generator) >= p
    return delta.float() * keep / (1 - p)


def merge_tensor(args: Args, name: str, tensors: list[Tensor], base: Tensor) -> Tensor:
    """One output tensor from the models' tensors of that name and the base's."""
    if not base.is_floating_point():
        return base.clone()  # integer buffers are not merged
    if args.method == "linear":
        return linear(tensors[0], base, args.alpha)
    if args.method == "slerp":
        return slerp(tensors[0], base, args.alpha)
    weights = args.weights or [1.0] * len(tensors)
    deltas = [t.float() - base.float() for t in tensors]
    if args.method in ("dare", "dare-ties"):
        gens = [torch.Generator().manual_seed(common.hash_int([args.seed, name, i])) for i in range(len(deltas))]
        deltas = [dare(d, args.drop_p, g) for d, g in zip(deltas, gens)]
    if args.method == "ties" or args.method == "dare-ties":
        return base.float() + ties(deltas, args.density, weights)
    return base.float() + sum(w * d for w, d in zip(weights, deltas))


# ───────────── streaming checkpoints ─────────────


class Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint directory (one file or a sharded index)."""

    def __init__(self, name: str):
        path = common.embedded_model_dir() if name == common.DEFAULT_MODEL else name
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name}: no such checkpoint directory")
        self.path, self.name = path, name
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self.files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.files = dict.fromkeys(f.keys(), os.path.join(path, "model.safetensors"))
        else:
            pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            what = (
                f"only pickle files ({', '.join(sorted(pickles))}), which are never loaded"
                if pickles
                else "no model.safetensors"
            )
            raise common.UserError(f"{name}: {what}; convert the checkpoint to safetensors first")
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        self.tied = self.config.get("tie_word_embeddings", False)

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> list[int]:
        with safe_open(self.files[name], "pt") as f:
            return f.get_slice(name).get_shape()

    def get(self, name: str) -> Tensor:
        if name not in self.files and name == "lm_head.weight" and self.tied:
            name = "model.embed_tokens.weight"  # a tied output layer is stored once, as the embeddings
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def check_compatible(base: Checkpoint, models: list[Checkpoint]) -> list[str]:
    """The tensor names to merge; a clear error for another architecture, a missing tensor or a shape.
    If any input stores its own output layer (untied), the merge has one too: a tied input contributes
    its embeddings there."""
    names = sorted(base.names() | ({"lm_head.weight"} if any("lm_head.weight" in m.names() for m in models) else set()))
    for m in models:
        if m.config.get("architectures") != base.config.get("architectures") or m.config.get("model_type") != base.config.get(
            "model_type"
        ):
            raise common.UserError(
                f"{m.name}: architecture {m.config.get('architectures')} differs from the base's {base.config.get('architectures')}"
            )
        for n in names:
            if n not in m.names() and not (n == "lm_head.weight" and m.tied):
                raise common.UserError(f"{m.name}: missing tensor {n!r}")
            mine, theirs = (c.shape(n if n in c.names() else "model.embed_tokens.weight") for c in (m, base))
            if mine != theirs:
                raise common.UserError(f"{m.name}: tensor {n!r} has shape {mine}, the base has {theirs}")
        extra = m.names() - set(names)
        if extra:
            raise common.UserError(f"{m.name}: tensor {min(extra)!r} is not in the base")
    return names


def write_merged(args: Args, base: Checkpoint, models: list[Checkpoint], names: list[str], tmp: str) -> None:
    """Merge tensor by tensor into shards of at most --shard-mb in `tmp`, with config and tokenizer."""
    shard, size, weight_map, shards = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        shards.append(fname)
        weight_map.update({k: fname for k in shard})
        shard, size = {}, 0

    for n in common.progress(names, "merging tensors"):
        b = base.get(n)
        t = merge_tensor(args, n, [m.get(n) for m in models], b).to(b.dtype).contiguous()
        if size and size + t.numel() * t.element_size() > args.shard_mb * 2**20:
            flush()
        shard[n], size = t, size + t.numel() * t.element_size()
    flush()
    if len(shards) == 1:
        os.rename(os.path.join(tmp, shards[0]), os.path.join(tmp, "model.safetensors"))
    else:
        total = sum(os.path.getsize(os.path.join(tmp, s)) for s in shards)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    src = models[0].path  # config, tokenizer and chat template of the (first) fine-tuned model
    for f in os.listdir(src):
        if f.endswith((".json", ".jinja", ".txt", ".model")) and not f.startswith("model") and f not in ("args.json",):
            shutil.copy(os.path.join(src, f), tmp)
    if "lm_head.weight" in names:  # an output layer of its own: the merged config must not tie it
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config, "tie_word_embeddings": False}, f, indent=2)


MARK = "merge.json"  # what merge.py writes into every output: how it was made, and that merge.py made it


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an --out that merge.py would have to delete without having written it: a file, or a
    non-empty directory that is not a previous merge output (no merge.json), unless --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARK)) and not overwrite:
        raise FileExistsError(f"--out {out} holds files merge.py did not write; choose another --out, or pass "
                              "--overwrite to replace it")  # fmt: skip


def merge(args: Args, out: str) -> str:
    """Stream the merge into `out` (atomically). Returns out."""
    if not args.models:
        raise common.UserError("--models is required: the fine-tuned checkpoint(s) to merge, e.g. --models runs/sft-...")
    if args.method in ("linear", "slerp") and len(args.models) != 1:
        raise common.UserError(f"--method {args.method} merges one model with the base; got {len(args.models)}")
    if args.weights and len(args.weights) != len(args.models):
        raise common.UserError(f"--weights has {len(args.weights)} values for {len(args.models)} models")
    if not 0 <= args.drop_p < 1:
        raise common.UserError(f"--drop-p {args.drop_p}: DARE drops a fraction p ∈ [0, 1) (p = 1 divides by 0)")
    if not 0 < args.density <= 1:
        raise common.UserError(f"--density {args.density}: TIES keeps a fraction ∈ (0, 1]")
    check_out(out, args.overwrite)
    base, models = Checkpoint(args.base), [Checkpoint(m) for m in args.models]
    names = check_compatible(base, models)
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_merged(args, base, models, names, tmp)
        with open(os.path.join(tmp, MARK), "w") as f:
            json.dump(vars(args), f, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    if os.path.exists(out):  # replace a previous output only once the new one is complete
        old = f"{out.rstrip('/')}.old{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


# ───────────── the alignment-tax curve ─────────────


@torch.no_grad()
def prose_loss(model, tokenizer, text: str, window: int = 512) -> float:
    """Mean next-token NLL of `text` in windows of `window` tokens: a capability the alignment did not train."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    docs = [{"input_ids": ids[i : i + window], "labels": ids[i : i + window]} for i in range(0, len(ids) - 1, window)]
    docs = [d for d in docs if len(d["input_ids"]) > 1]
    logp, _ = common.token_logps(model, common.collate_packed(docs))
    mask = common.collate_packed(docs)["position_ids"] > 0  # every token that has a context
    return float(-(logp * mask).sum() / mask.sum())


def sweep(args: Args, out: str) -> list[dict]:
    """Merge at each α, evaluate greedy task accuracy and the NLL of held-out prose (the README: no
    arithmetic problems in it), write sweep.json and sweep.png into `out`."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        prose = f.read()
    problems = common.builtin_task("test", args.num_eval)
    rows = []
    check_out(out, args.overwrite)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARK), "w") as f:
        json.dump(vars(args), f, indent=1)
    for alpha in args.sweep:
        path = merge(Args(**{**vars(args), "alpha": alpha, "sweep": []}), os.path.join(out, "current"))
        tokenizer = common.load_tokenizer(path)
        model = common.load_model(path, tokenizer).eval()
        rows.append({"alpha": alpha, "task_accuracy": common.greedy_accuracy(model, tokenizer, problems, args.max_new_tokens),
                     "prose_nll": prose_loss(model, tokenizer, prose)})  # fmt: skip
        print(rows[-1], flush=True)
    shutil.rmtree(os.path.join(out, "current"), ignore_errors=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plt = common.pyplot(os.path.join(out, "sweep.png"))
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["prose_nll"] for r in rows], [r["task_accuracy"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(
            f"α={r['alpha']:g}", (r["prose_nll"], r["task_accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.set_xlabel("held-out prose NLL (lower: less forgetting)")
    ax.set_ylabel("built-in task greedy accuracy")
    ax.set_title("WiSE-FT: θ = (1 − α) θ_aligned + α θ_base")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
    return rows


def main(args: Args) -> str:
    out = args.out or os.path.join("runs", f"merge-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.sweep:
        if args.method != "linear":
            raise common.UserError("--sweep is the WiSE-FT curve: it needs --method linear")
        sweep(args, out)
        return out
    merge(args, out)
    print(f"merged {len(args.models)} model(s) into {out} ({args.method})")
    return out


if __name__ == "__main__":
    common.run_cli(main, tyro.cli(Args))
