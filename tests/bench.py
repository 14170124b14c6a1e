"""Side-by-side benchmarks against TRL, and the README's plots. Not part of the test run.

    pip install -e ".[bench]"
    python tests/bench.py logps            # peak memory of per-token log-probs, T=4096, V=49152
    python tests/bench.py sft              # sft.py vs TRL SFTTrainer: tokens/s, peak RSS, FLOP/s
    python tests/bench.py dpo [precompute|live]  # dpo.py vs TRL DPOTrainer: step time, peak RSS
    python tests/bench.py grpo [mask|keep]  # grpo.py vs TRL GRPOTrainer (vLLM off): generation / training time, peak RSS
    python tests/bench.py shared           # one copy of the prompt per pair / group: tokens forwarded, forward + backward time
    python tests/bench.py plot OUT.png RUN_DIR[:label] ... --keys=loss,eval/accuracy

Every measurement runs in a subprocess of its own, so its peak RSS is its alone. Both sides use the
same model (the embedded SmolLM2-135M-Instruct, fp32 on CPU), the same built-in data, the same
tokens per step and the same optimizer (fused AdamW, the transformers default; β as each script sets
it: (0.9, 0.95) in sft.py, (0.9, 0.999) in dpo.py and grpo.py; clip 1.0). Step times
are medians over the timed steps (the first step is warm-up and not counted).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import common  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def in_subprocess(*args) -> dict:
    """Run `bench.py _worker args...` and return the JSON it prints last."""
    out = subprocess.run([sys.executable, __file__, "_worker", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


# ───────────── log-prob memory ─────────────


def worker_logps(method: str, grad: str) -> dict:
    T, V, H = 4096, 49152, 576
    torch.manual_seed(0)
    hidden = torch.randn(T, H) * 0.1
    weight = torch.randn(V, H) * 0.02
    target = torch.randint(0, V, (T,))
    hidden.requires_grad_(grad == "grad")
    weight.requires_grad_(grad == "grad")
    base = rss_mb()
    t0 = time.time()
    with torch.set_grad_enabled(grad == "grad"):
        if method == "naive":  # log_softmax(...).gather(...): a full (T, V) float32 log-softmax
            logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, target[:, None]).squeeze(1)
        elif method == "selective":  # the logits exist, their log-softmax never does (logsumexp per row)
            logits = hidden @ weight.T
            logp = logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(1)
        else:  # from hidden states in chunks: neither the logits nor their log-softmax exist at once
            logp, _ = common.hidden_logps(hidden, lambda h: h @ weight.T, target)
        if grad == "grad":
            logp.sum().backward()
    return {"method": method, "mode": grad, "peak_extra_MB": peak_rss_mb() - base, "seconds": time.time() - t0}


def bench_logps():
    rows = [in_subprocess("logps", m, g) for g in ("nograd", "grad") for m in ("naive", "selective", "hidden")]
    print("T=4096, V=49152, H=576, fp32; peak RSS above the inputs (logits alone are 805 MB)")
    print(table(rows, ["method", "mode", "peak_extra_MB", "seconds"]))


# ───────────── SFT ─────────────

SFT_STEPS, SFT_PACKED_TOKENS, SFT_PADDED_BATCH, LR = 6, 1024, 8, 1e-5


def matmul_flops() -> float:
    """This machine's fp32 matmul rate (FLOP/s), 2048^3 products."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0, n = time.time(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.time() - t0)


def worker_ours_sft(packing: str, recompute: str) -> dict:
    import sft

    samples = sft.load_samples("builtin", common.load_tokenizer(common.DEFAULT_MODEL), 2048, "drop", "train", 400, 0)[0]
    mean_len = sum(len(s["input_ids"]) for s in samples) / len(samples)
    packed = packing == "packed"
    batch = round(SFT_PACKED_TOKENS / mean_len) if packed else SFT_PADDED_BATCH
    with tempfile.TemporaryDirectory() as out:
        args = sft.Args(num_train=400, num_eval=0, batch_size=batch, max_steps=SFT_STEPS, warmup_steps=0, lr=LR,
                        packing=packed, gradient_checkpointing=recompute == "on", save_every=0, output_dir=out)  # fmt: skip
        sft.main(args)
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]), "peak_rss_MB": peak_rss_mb()}


class StepTimer:
    """A TRL callback: wall time and real tokens of every optimizer step."""

    def __init__(self):
        self.times, self.tokens = [], []

    def __getattr__(self, name):  # every other callback event is a no-op
        return lambda *a, **k: None

    def on_step_begin(self, args, state, control, **kw):
        self.t0, self.seen = time.time(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.time() - self.t0)
        self.tokens.append(state.num_input_tokens_seen - self.seen)


def trl_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(common.embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")


def worker_trl_sft(packing: str, recompute: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "completion": [{"role": "assistant", "content": p["completion"]}]}
            for p in common.builtin_task("train", 400)]  # fmt: skip
    packed = packing == "packed"
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=SFT_STEPS, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        per_device_train_batch_size=1 if packed else SFT_PADDED_BATCH, packing=packed,
        max_length=SFT_PACKED_TOKENS if packed else 2048, completion_only_loss=True, save_strategy="no",
        report_to=[], logging_steps=1, use_cpu=True, bf16=False, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", seed=0, gradient_checkpointing=recompute == "on",
    )  # fmt: skip
    timer = StepTimer()
    trainer = SFTTrainer(model=trl_model(), args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
    trainer.train()
    tps = [n / t for n, t in zip(timer.tokens[1:], timer.times[1:])]
    return {"tokens_per_s": statistics.median(tps), "peak_rss_MB": peak_rss_mb()}


def bench_sft():
    n_params = sum(p.numel() for p in trl_model().parameters())
    peak = matmul_flops()
    rows = []
    # TRL turns activation recompute (gradient checkpointing) on by default, cleanpost off: compare
    # like with like, both off, and packed with both on
    for packing, recompute in (("packed", "off"), ("padded", "off"), ("packed", "on")):
        for side in ("cleanpost", "trl"):
            r = in_subprocess(("ours" if side == "cleanpost" else "trl") + "_sft", packing, recompute)
            mfu = 6 * n_params * r["tokens_per_s"] / peak  # model FLOPs: 6 N per trained token
            rows.append({"run": f"{side} {packing}, recompute {recompute}", **r, "model_FLOP/s_frac": mfu})
            print(rows[-1], flush=True)
        ours, trl = rows[-2], rows[-1]
        ours["speedup_vs_trl"], trl["speedup_vs_trl"] = ours["tokens_per_s"] / trl["tokens_per_s"], 1.0
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, matmul peak {peak / 1e9:.1f} GFLOP/s, {SFT_STEPS} steps")
    print(table(rows, ["run", "tokens_per_s", "speedup_vs_trl", "peak_rss_MB", "model_FLOP/s_frac"]))


# ───────────── DPO ─────────────

DPO_STEPS, DPO_BATCH = 5, 8


def worker_ours_dpo(precompute: str) -> dict:
    import dpo

    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        args = dpo.Args(num_train=DPO_BATCH * DPO_STEPS, num_eval=0, batch_size=DPO_BATCH, max_steps=DPO_STEPS, lr=LR,
                        warmup_steps=0, max_grad_norm=1.0, precompute_ref=precompute == "precompute", save_every=0,
                        rejected="data", output_dir=out)  # fmt: skip  (the pairs TRL trains on)
        dpo.main(args)
        wall = time.time() - t0
        times = [json.loads(l)["time"] for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    return {"step_s": statistics.median(b - a for a, b in zip(times, times[1:])), "wall_s": wall, "peak_rss_MB": peak_rss_mb()}


def worker_trl_dpo(precompute: str) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]}
            for p in common.builtin_preferences("train", DPO_BATCH * DPO_STEPS)]  # fmt: skip
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=DPO_STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", per_device_train_batch_size=DPO_BATCH,
        beta=0.1, precompute_ref_log_probs=precompute == "precompute", save_strategy="no", report_to=[], logging_steps=1,
        use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, gradient_checkpointing=False,  # as dpo.py
    )  # fmt: skip
    timer = StepTimer()
    t0 = time.time()
    trainer = DPOTrainer(model=trl_model(), args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"step_s": statistics.median(timer.times[1:]), "wall_s": time.time() - t0, "peak_rss_MB": peak_rss_mb()}


def bench_dpo(*modes):
    rows = []
    for precompute in modes or ("precompute", "live"):
        for side in ("cleanpost", "trl"):
            r = in_subprocess(("ours" if side == "cleanpost" else "trl") + "_dpo", precompute)
            rows.append({"run": f"{side} {precompute} ref", **r})
            print(rows[-1], flush=True)
        ours, trl = rows[-2], rows[-1]
        ours["speedup_vs_trl"], trl["speedup_vs_trl"] = trl["step_s"] / ours["step_s"], 1.0
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, {DPO_BATCH} pairs per step, {DPO_STEPS} steps "
          "(wall includes model load and the reference pass)")  # fmt: skip
    print(table(rows, ["run", "step_s", "speedup_vs_trl", "wall_s", "peak_rss_MB"]))


# ───────────── GRPO ─────────────

GRPO_STEPS, GRPO_PROMPTS, GRPO_G, GRPO_LEN = 4, 4, 8, 64


def worker_ours_grpo(truncated: str) -> dict:
    """truncated: "mask" leaves answers cut off at the budget out of the loss (both sides skip them: we do not
    even run them through the update), "keep" trains on every answer."""
    import grpo

    with tempfile.TemporaryDirectory() as out:
        args = grpo.Args(num_eval=0, prompts_per_step=GRPO_PROMPTS, group_size=GRPO_G, max_new_tokens=GRPO_LEN, lr=LR, beta=0.04,
                         clip_high=0.28, max_grad_norm=1.0, max_steps=GRPO_STEPS, save_every=0, output_dir=out,
                         overlong="mask" if truncated == "mask" else "none")  # fmt: skip
        grpo.main(args)
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    steps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    return {"step_s": statistics.median(steps), "generation_s": statistics.median(r["time/generation_s"] for r in rows[1:]),
            "training_s": statistics.median(r["time/training_s"] for r in rows[1:]),
            "completion_len": statistics.mean(r["response_length"] for r in rows), "peak_rss_MB": peak_rss_mb()}  # fmt: skip


def worker_trl_grpo(truncated: str) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]}
            for p in common.builtin_prompts("train", GRPO_PROMPTS * GRPO_STEPS)]  # fmt: skip

    def reward(completions, answer, **kw):  # the same rule reward as grpo.py: right answer + 0.1 for the format
        texts = [c[-1]["content"] for c in completions]
        return [common.rule_reward(t, a) + 0.1 * common.format_reward(t) for t, a in zip(texts, answer)]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=GRPO_STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", per_device_train_batch_size=GRPO_PROMPTS * GRPO_G,
        num_generations=GRPO_G, max_completion_length=GRPO_LEN, temperature=1.0, beta=0.04, epsilon=0.2, epsilon_high=0.28,
        loss_type="dapo", mask_truncated_completions=truncated == "mask", use_vllm=False, save_strategy="no", report_to=[], logging_steps=1,
        use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, gradient_checkpointing=False,  # as grpo.py
    )  # fmt: skip
    timer = StepTimer()
    trainer = GRPOTrainer(model=trl_model(), reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[timer])  # fmt: skip
    gen_times, generate = [], trainer._generate_and_score_completions

    def timed(*a, **k):  # sampling + scoring (+ TRL's old/ref log-prob passes), once per step here
        t0 = time.time()
        out = generate(*a, **k)
        gen_times.append(time.time() - t0)
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()
    step = statistics.median(timer.times[1:])
    gen = statistics.median(gen_times[1:])
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": step, "generation_s": gen, "training_s": step - gen, "completion_len": statistics.mean(lengths),
            "peak_rss_MB": peak_rss_mb()}  # fmt: skip


def bench_grpo(*modes):
    rows = []
    for truncated in modes or ("mask", "keep"):
        pair = []
        for side in ("cleanpost", "trl"):
            pair.append({"run": f"{side}, truncated answers: {truncated}",
                         **in_subprocess(("ours" if side == "cleanpost" else "trl") + "_grpo", truncated)})  # fmt: skip
            print(pair[-1], flush=True)
        pair[0]["speedup_vs_trl"], pair[1]["speedup_vs_trl"] = pair[1]["step_s"] / pair[0]["step_s"], 1.0
        rows += pair
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, {GRPO_PROMPTS} prompts x G = {GRPO_G}, {GRPO_LEN} new tokens, "
          f"{GRPO_STEPS} steps, vLLM off")  # fmt: skip
    print(table(rows, ["run", "step_s", "generation_s", "training_s", "completion_len", "speedup_vs_trl", "peak_rss_MB"]))


# ───────────── shared prefixes ─────────────

SHAPES = {  # name: (groups, answers per group); None: the built-in data
    "dpo: 8 built-in pairs": None,
    "grpo: 4 built-in prompts x G = 8, answers of 40": (4, 8, None, 40),
    "long prompt: 2 prompts of 400 x G = 8, answers of 100": (2, 8, 400, 100),
}


def worker_shared(shape: str, share: str) -> dict:
    """Forward + backward of the summed answer log-probs of one shape's batch, shared or not (median of 3
    after a warm-up); answers are random tokens (their values do not change the cost)."""
    import dpo

    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    model = common.load_model(common.DEFAULT_MODEL, tok).train()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, len(tok) - 100, (n,), generator=g).tolist()  # noqa: E731
    if SHAPES[shape] is None:
        pairs, _ = dpo.tokenize_pairs(common.builtin_preferences("train", 8), tok, 4096)
        batches = [b for _, b in dpo.pair_batches(pairs, 10**6, share == "shared")]
        unshared = sum(len(p[k]["input_ids"]) for p in pairs for k in ("chosen", "rejected"))
    else:
        n_groups, size, prompt_len, answer_len = SHAPES[shape]
        prompts = [common.tokenize_conversation(tok, common.as_messages(p["prompt"]))["input_ids"] if prompt_len is None
                   else rand(prompt_len) for p in common.builtin_prompts("train", n_groups)]  # fmt: skip
        samples = [{"input_ids": p + a, "labels": [common.IGNORE] * len(p) + a} for p in prompts for a in (rand(answer_len) for _ in range(size))]
        batches = [b for _, b in common.packed_batches(samples, 10**6, share == "shared")]
        unshared = sum(len(s["input_ids"]) for s in samples)
    times = []
    for _ in range(4):
        t0 = time.time()
        for b in batches:
            logp, _ = common.token_logps(model, b)
            (logp * (b["labels"] != common.IGNORE)).sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    return {"tokens": sum(b["input_ids"].shape[1] for b in batches), "unshared_tokens": unshared,
            "fwd_bwd_s": statistics.median(times[1:]), "peak_rss_MB": peak_rss_mb()}  # fmt: skip


def bench_shared():
    rows = []
    for shape in SHAPES:
        pair = [{"shape": shape, "layout": share, **in_subprocess("shared", shape, share)} for share in ("unshared", "shared")]
        pair[1]["speedup"], pair[0]["speedup"] = pair[0]["fwd_bwd_s"] / pair[1]["fwd_bwd_s"], 1.0
        rows += pair
        print(pair, flush=True)
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, forward + backward of the answers' log-probs")
    print(table(rows, ["shape", "layout", "tokens", "fwd_bwd_s", "speedup", "peak_rss_MB"]))


# ───────────── plots ─────────────


def plot(out_png: str, runs: list[str], keys: list[str]):
    """One panel per key ("a+b" puts two metrics in one panel), one line per run, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for spec in runs:
        path, _, label = spec.partition(":")
        rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]
        for ax, panel in zip(axes[0], keys):
            for key in panel.split("+"):  # "a+b": both metrics in one panel
                pts = [(r["step"], r[key]) for r in rows if key in r]
                name = (label or os.path.basename(path)) + (f" {key}" if "+" in panel else "")
                if pts:
                    ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=name)
    for ax, key in zip(axes[0], keys):
        ax.set_title(key.replace("+", " and "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def plot_best_of_n(out_png: str, result_json: str):
    """Accuracy against N for each scorer of an `rm.py --best-of-n` run, from its best_of_n.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(result_json) as f:
        r = json.load(f)
    ns = sorted({int(k.split("@")[1]) for k in r if "@" in k})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for scorer in ("pass", "orm", "prm_min", "prm_product"):
        if f"bon/{scorer}@{ns[0]}" in r:
            label = "pass@N (oracle)" if scorer == "pass" else scorer
            ax.plot([1] + ns, [r["bon/sample"]] + [r[f"bon/{scorer}@{n}"] for n in ns], marker="o", label=label)
    ax.axhline(r["bon/greedy"], color="gray", ls="--", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "_worker":
        print(json.dumps(globals()["worker_" + rest[0]](*rest[1:])))
    elif cmd == "plot-best-of-n":
        plot_best_of_n(rest[0], rest[1])
    elif cmd == "plot":
        keys = next((a.split("=", 1)[1] for a in rest if a.startswith("--keys=")), "loss").split(",")
        plot(rest[0], [a for a in rest[1:] if not a.startswith("--keys=")], keys)
    else:
        {"logps": bench_logps, "sft": bench_sft, "dpo": bench_dpo, "grpo": bench_grpo, "shared": bench_shared}[cmd](*rest)
