"""One command that checks every CUDA path of cleanpost on a GPU machine, offline, in a few minutes;
not part of the default test run (its CPU mode is: tests/test_gpu_check.py).

    python tests/gpu_check.py                   # CUDA: everything below (~5 min on one H100/H200)
    python tests/gpu_check.py --device cpu      # tiny shapes, the same code but the device calls (~2 min)
    python tests/gpu_check.py --only attention,precision --out report.json

1. attention  packed rows (flash-attn's varlen kernel when installed, else torch's varlen_attn) against
              each document alone through SDPA, float32 and bf16 autocast, for every model family of
              tests/zoo.py: per-token log-probs and gradients, within the tolerances in TOLERANCE; and
              a group of answers sharing one prompt (common.collate_shared) against each answer alone
2. scripts    3 steps of every algorithm script on the tiny model, through torchrun with 1 process
              (and 2 when the machine has 2 GPUs), bf16 autocast on CUDA: finite losses, and a saved
              model that reloads (merge.py merges two of the outputs)
3. speed      SFT tokens/s, model FLOP/s as a fraction of the GPU's bf16 peak (MFU) and peak memory on a
              random Qwen2.5-0.5B-shaped model (its published sizes, no weights) at 4096 tokens per row,
              packed vs padded, gradient checkpointing off/on; DPO step time; common.generate tokens/s
4. precision  per-token log-probs under bf16 autocast against float32, same model and tokens, after the
              speed section's SFT steps (so the distributions are no longer a random model's)

Prints one table and writes every number to a JSON report (--out). A check that raises is recorded
with its error and the run goes on, so one run shows everything that is wrong.
"""

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import common  # noqa: E402
import dpo  # noqa: E402
import sft  # noqa: E402
from zoo import FAMILIES, tiny_family  # noqa: E402

# |Δ| between packed and per-document attention: log-probs in nats per token, gradients as ‖Δg‖ / ‖g‖
TOLERANCE = {"float32": {"logp_max": 1e-4, "grad_rel": 1e-4}, "bf16": {"logp_max": 0.1, "logp_mean": 0.01, "grad_rel": 0.05}}
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense, datasheets
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)  # fmt: skip
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip


class Clock:
    """Wall time of a region, the device's queue drained at both ends."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def matmul_precision(device, level: str) -> None:
    """float32 matrix products on CUDA: "highest" (IEEE float32) or "high" (TF32, what the scripts set).
    CPU keeps its default."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision(level)


def peak_memory_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ───────────── 1. attention: packed rows against each document alone ─────────────


def attention_path(model, device, half: bool) -> str:
    """Which kernel packed_attention takes for this model's packed rows (common.packed_kernel decides)."""
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
    with common.autocast(device) if half else torch.autocast(device.type, enabled=False):
        return common.packed_kernel(torch.zeros(1, device=device), softcap) + (" (soft-capped scores)" if softcap else "")


def logps_and_grads(model, batches: list[dict], device, half: bool) -> tuple[Tensor, list]:
    """Per-token log-probs at the labelled positions of `batches` (concatenated) and the gradient of
    their sum with respect to every parameter."""
    model.zero_grad(set_to_none=True)
    out = []
    for batch in batches:
        batch = common.to_device(batch, device)
        with common.autocast(device) if half else torch.autocast(device.type, enabled=False):
            logp, _ = common.token_logps(model, batch)
        picked = logp[batch["labels"] != common.IGNORE]  # logp[t] = log π(token t | tokens < t)
        picked.sum().backward()
        out.append(picked.detach().float())
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    return torch.cat(out), grads


def check_attention(device, families: list[str]) -> list[dict]:
    tokenizer = common.tiny_tokenizer()
    gen = torch.Generator().manual_seed(0)
    lengths = (45, 130, 17, 64)  # longer and shorter than the families' sliding windows (6)
    docs = [torch.randint(3, len(tokenizer), (n,), generator=gen).tolist() for n in lengths]
    samples = [{"input_ids": d, "labels": [common.IGNORE] + d[1:]} for d in docs]
    prompt = docs[1][:40]  # a group: one prompt, four answers (shared-prefix layout)
    group = [{"input_ids": prompt + d[:k], "labels": [common.IGNORE] * len(prompt) + d[:k]} for d, k in zip(docs, (20, 60, 1, 33))]
    layouts = {"packed": ([common.collate_packed(samples)], [common.collate_padded([s], tokenizer.pad_token_id) for s in samples]),
               "shared prompt": ([common.collate_shared([group])], [common.collate_padded([s], tokenizer.pad_token_id) for s in group])}
    rows = []
    for name in families:
        model = common.prepare_model(tiny_family(name, tokenizer).to(device))
        model.train()  # dropout is off (prepare_model); train mode is how the scripts take gradients
        for (precision, half), (layout, (packed, alone)) in itertools.product((("float32", False), ("bf16", True)), layouts.items()):
            path = attention_path(model, device, half) if layout == "packed" else "per segment (SDPA)"
            row = {"check": "attention", "family": name, "precision": precision, "layout": layout, "path": path}
            try:
                lp, gp = logps_and_grads(model, packed, device, half)
                lr, gr = logps_and_grads(model, alone, device, half)
                delta = (lp - lr).abs()
                grad_rel = max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(gp, gr))
                row.update(logp_max=float(delta.max()), logp_mean=float(delta.mean()), grad_rel=grad_rel)
                tol = TOLERANCE[precision]
                row["ok"] = all(row[k] <= v for k, v in tol.items()) and bool(torch.isfinite(lp).all())
            except Exception as e:  # recorded; the next check runs
                row.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=6))
            rows.append(row)
    return rows


# ───────────── 2. every script end to end ─────────────


def script_runs(out: str, fast: bool) -> list[tuple[str, str, list[str]]]:
    """(name, script, arguments) of a 3-step run of each script on the tiny model."""
    small = ["--model", "tiny", "--num-eval", "4", "--max-steps", "3", "--save-every", "0"]
    rl = small + ["--num-train", "16", "--prompts-per-step", "4", "--max-new-tokens", "8"]
    runs = [
        ("sft", "sft.py", small + ["--num-train", "32", "--batch-size", "8", "--max-new-tokens", "4"]),
        ("rm", "rm.py", small + ["--num-train", "32", "--batch-size", "8"]),
        ("dpo", "dpo.py", small + ["--num-train", "32", "--batch-size", "8", "--max-new-tokens", "4", "--rejected", "data"]),
        ("variants-kto", "variants.py", small + ["--loss", "kto", "--num-train", "32", "--batch-size", "8", "--max-new-tokens", "4"]),
        ("grpo", "grpo.py", rl + ["--group-size", "4"]),
        ("rloo", "rloo_remax.py", rl + ["--group-size", "4", "--estimator", "rloo"]),
        ("ppo", "ppo.py", rl),
        ("distill-token", "distill.py", ["--teacher", "tiny", "--student-layers", "1", "--num-train", "32", "--num-eval", "4",
                                         "--batch-size", "8", "--max-new-tokens", "8", "--num-generate", "8", "--max-steps", "3",
                                         "--save-every", "0"]),
        ("cai", "cai.py", small + ["--num-generate", "8", "--batch-size", "4", "--max-new-tokens", "8"]),
    ]  # fmt: skip
    if fast:  # CPU: the scripts' own tests run each of them far more thoroughly; keep one of each kind
        runs = [r for r in runs if r[0] in ("sft", "dpo", "grpo")]
    return [(name, script, args + ["--output-dir", os.path.join(out, name)]) for name, script, args in runs]


def finite_losses(out_dir: str) -> tuple[int, bool]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return len(losses), bool(losses) and all(math.isfinite(x) for x in losses)


def reloads(out_dir: str, reward: bool) -> bool:
    """The saved directory loads with plain transformers (then cleanpost's own check of packed log-probs
    against the model's forward, in prepare_model) and gives finite outputs."""
    model = common.load_reward_model(out_dir) if reward else common.load_model(out_dir)
    ids = torch.arange(3, 20)[None]
    out = model(input_ids=ids)
    return bool(torch.isfinite(out.logits).all())


def check_scripts(device, fast: bool, jobs: int) -> list[dict]:
    work = tempfile.mkdtemp(prefix="gpu_check-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    procs = [1] + ([2] if device.type == "cuda" and torch.cuda.device_count() >= 2 else [])
    todo = [(n, nproc, script, args) for nproc in procs for n, script, args in script_runs(os.path.join(work, f"p{nproc}"), fast)]
    rows, running = [], []

    def launch(name, nproc, script, args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]
        log = open(os.path.join(work, f"{name}-{nproc}.log"), "w")
        return (name, nproc, args, time.time(), log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def finish(name, nproc, args, t0, log, p):
        log.close()
        out_dir = args[args.index("--output-dir") + 1]
        row = {"check": "script", "script": name, "processes": nproc, "seconds": round(time.time() - t0, 1), "rc": p.returncode}
        try:
            if p.returncode != 0:
                raise RuntimeError(open(log.name).read()[-2500:])
            row["steps"], row["finite"] = finite_losses(out_dir)
            row["reloads"] = reloads(out_dir, reward=name == "rm")
            row["ok"] = row["finite"] and row["reloads"] and row["steps"] >= 3
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        return row

    while todo or running:
        while todo and len(running) < jobs:
            running.append(launch(*todo.pop(0)))
        for r in list(running):
            if r[-1].poll() is not None:
                running.remove(r)
                rows.append(finish(*r))
        time.sleep(0.2)
    for nproc in procs:  # merge.py on two of the outputs: the task vector of DPO over SFT, added once
        base = os.path.join(work, f"p{nproc}")
        out = os.path.join(base, "merged")
        cmd = [sys.executable, "merge.py", "--method", "task-arithmetic", "--models", os.path.join(base, "dpo"),
               "--base", os.path.join(base, "sft"), "--out", out]  # fmt: skip
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        row = {"check": "script", "script": "merge", "processes": 1, "rc": p.returncode}
        try:
            if p.returncode != 0:
                raise RuntimeError((p.stdout + p.stderr)[-2500:])
            row.update(reloads=reloads(out, reward=False), ok=None)
            row["ok"] = row["reloads"]
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
    shutil.rmtree(work, ignore_errors=True)
    return rows


# ───────────── 3. speed and memory ─────────────


def shaped_model(shape: dict, device, seed: int = 0):
    """A random-init Qwen2 causal LM of the given sizes, float32 weights (the scripts train in float32
    with bf16 autocast on CUDA), prepared as load_model prepares any model."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return common.prepare_model(model)


def training_flops(model, batches: list[dict]) -> float:
    """Model FLOPs of a forward and backward over the real tokens of `batches` (padding is not work):
    6 per weight of every matrix product (the output layer included, the embedding lookup not) per
    token, plus causal attention's 6·d_attn·L² per layer and document of L tokens (QKᵀ and AV, forward
    ×1, backward ×2, half of the L² pairs)."""
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    if cfg.tie_word_embeddings:
        matmul += model.get_output_embeddings().weight.numel()
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    flops = 0.0
    for b in batches:
        mask = b.get("attention_mask")
        if "cu_seqlens" in b:
            lens = b["cu_seqlens"].diff().tolist()
        else:
            lens = mask.sum(1).tolist()
        flops += 6 * matmul * sum(lens) + 6 * cfg.num_hidden_layers * d_attn * sum(n * n for n in lens)
    return flops


def sft_steps(model, steps: list[list[dict]], device) -> list[float]:
    """sft.py's optimizer step (token-normalised loss, clip 1.0, AdamW) on each step's micro-batches;
    the seconds of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    times = []
    for batches in steps:
        with Clock(device) as clock:
            num_units = torch.tensor(float(sum(sft.units(b, "token") for b in batches)), device=device)
            for batch in batches:
                batch = common.to_device(batch, device)
                with common.autocast(device):
                    logp, _ = common.token_logps(model, batch)
                loss = sft.sft_loss(logp, batch["labels"] != common.IGNORE, "token", common.doc_ids(batch), num_units)
                loss.backward()
            common.check_finite(loss.detach(), "the loss", len(times))
            common.clip_grad_norm(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(clock.seconds)
    return times


def measured_bf16_peak(device) -> float | None:
    """FLOP/s of a large bf16 matrix product on random data (the ceiling this card reaches)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    with Clock(device) as clock:
        for _ in range(10):
            a @ b
    return 10 * 2 * 8192**3 / clock.seconds


def check_speed(device, cpu: bool) -> tuple[list[dict], object]:
    shape, row_tokens = (TINY_SHAPE, 256) if cpu else (QWEN25_05B, 4096)
    rows_per_step, warmup, timed = (2, 1, 2) if cpu else (8, 2, 5)
    tokenizer = common.tiny_tokenizer()
    samples = [common.tokenize_conversation(tokenizer, c) for c in common.builtin_sft("train", 3000 if not cpu else 200)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    measured = measured_bf16_peak(device)
    info = {"check": "speed-info", "device": name, "bf16_peak_datasheet": peak, "bf16_peak_measured": measured,
            "shape": "Qwen2.5-0.5B" if not cpu else "tiny", "tokens_per_row": row_tokens}  # fmt: skip
    rows, trained = [info], None
    # (packed, gradient checkpointing, tokens per micro-batch, float32 matmuls): the scripts' CUDA setting
    # is TF32 ("high", init_distributed); "highest" shows the output layer in true float32
    configs = [(True, False, row_tokens, "high"), (True, True, row_tokens, "high"), (False, False, row_tokens, "high"),
               (False, True, row_tokens, "high"), (True, False, row_tokens, "highest"), (True, False, 4 * row_tokens, "high")]  # fmt: skip
    for packing, ckpt, width, matmul in configs:
        row = {"check": "speed", "what": "sft", "packing": packing, "grad_ckpt": ckpt, "tokens_per_row": width,
               "fp32_matmul": matmul}  # fmt: skip
        try:
            reset_peak_memory(device)
            matmul_precision(device, matmul)
            model = shaped_model(shape, device)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            batches = sft.micro_batches(samples, width, packing, tokenizer.pad_token_id)
            n = max(1, rows_per_step * row_tokens // width)  # the same tokens per step in every configuration
            steps = [batches[i * n : (i + 1) * n] for i in range(warmup + timed)]
            times = sft_steps(model, steps, device)[warmup:]
            tokens = sum(common.num_tokens(b) for s in steps[warmup:] for b in s)
            flops = sum(training_flops(model, s) for s in steps[warmup:])
            seconds = sum(times)
            row.update(tokens_per_s=tokens / seconds, tflops=flops / seconds / 1e12, step_s=seconds / timed,
                       peak_gb=peak_memory_gb(device), ok=True)  # fmt: skip
            if peak:
                row["mfu"] = flops / seconds / peak
            if measured:
                row["of_measured_peak"] = flops / seconds / measured
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=6))
        rows.append(row)
        matmul_precision(device, "high")
        if (packing, ckpt, width, matmul) == configs[0] and row["ok"]:
            trained = model  # the DPO, generation and precision checks go on with it, trained some more steps
            more = sft.micro_batches(samples[::-1], width, packing, tokenizer.pad_token_id)[: (2 if cpu else 30) * n]
            sft_steps(trained, [more[i : i + n] for i in range(0, len(more), n)], device)
        model = None
    if trained is not None and device.type == "cuda":
        rows.append(profile_sft_step(trained, more[:n], device))
    if trained is not None:
        rows += check_dpo_speed(trained, tokenizer, device, cpu, 4096)
        rows += check_generation_speed(trained, tokenizer, device, cpu)
    return rows, trained


def profile_sft_step(model, batches: list[dict], device) -> dict:
    """Where one SFT step's time goes: the CUDA kernels and operators taking the most time."""
    row = {"check": "profile", "what": "one packed sft step"}
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sft_steps(model, [batches], device)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        row.update(ok=None, table=table)
        print(table)
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}")
    return row


def check_dpo_speed(model, tokenizer, device, cpu: bool, row_tokens: int) -> list[dict]:
    """dpo.py's step: policy log-probs of each pair in one packed row, the reference's precomputed; with
    the pair's prompt once (--share-prompt, the default) and in both documents."""
    return [dpo_speed(model, tokenizer, device, cpu, row_tokens, share) for share in (True, False)]


def dpo_speed(model, tokenizer, device, cpu: bool, row_tokens: int, share: bool) -> dict:
    row = {"check": "speed", "what": "dpo, shared prompt" if share else "dpo, prompt in both documents"}
    try:
        pairs, _ = dpo.tokenize_pairs(common.builtin_preferences("train", 64 if cpu else 512), tokenizer, row_tokens)
        n_steps, per_step = (2, 16) if cpu else (4, 128)
        if len(pairs) < n_steps * per_step:
            raise ValueError(f"only {len(pairs)} pairs fit in {row_tokens} tokens")
        steps = [pairs[i * per_step : (i + 1) * per_step] for i in range(n_steps)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        times = []
        for step_pairs in steps:
            batches = dpo.pair_batches(step_pairs, row_tokens, share)
            ref = dpo.all_pair_logps(model, step_pairs, row_tokens, 0, 1, device, share=share).to(device)
            with Clock(device) as clock:
                for local, batch in batches:
                    batch = common.to_device(batch, device)
                    with common.autocast(device):
                        pi_w, pi_l = dpo.pair_logps(model, batch)
                    loss, _, _ = dpo.dpo_loss(pi_w, pi_l, ref[local, 0], ref[local, 1], 0.1)
                    (loss.sum() / len(step_pairs)).backward()
                common.clip_grad_norm(model, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times.append(clock.seconds)
        timed = times[1:]
        tokens = sum(common.num_tokens(b) for _, b in dpo.pair_batches(steps[-1], row_tokens, share))
        row.update(pairs_per_step=per_step, step_s=sum(timed) / len(timed), tokens_per_s=tokens / timed[-1], ok=True)
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=6))
    return row


def check_generation_speed(model, tokenizer, device, cpu: bool) -> list[dict]:
    """common.generate as the RL scripts call it (bf16 autocast on CUDA, sampled, KV cache)."""
    row = {"check": "speed", "what": "generate"}
    try:
        prompts = [p["prompt"] for p in common.builtin_prompts("test", 8 if cpu else 128)]
        new = 16 if cpu else 256
        with common.autocast(device):
            common.generate(model, tokenizer, prompts[:2], 4, temperature=1.0)  # warm-up
            with Clock(device) as clock:
                out = common.generate(model, tokenizer, prompts, new, temperature=1.0, batch_size=len(prompts))
        tokens = sum(len(o["completion_ids"]) for o in out)
        row.update(prompts=len(prompts), max_new_tokens=new, tokens=tokens, tokens_per_s=tokens / clock.seconds, ok=True)
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=6))
    return [row]


# ───────────── 4. bf16 log-prob precision ─────────────


@torch.no_grad()
def labelled_logps(model, batches: list[dict], device, half: bool) -> Tensor:
    out = []
    for batch in batches:
        batch = common.to_device(batch, device)
        with common.autocast(device) if half else torch.autocast(device.type, enabled=False):
            logp, _ = common.token_logps(model, batch)
        out.append(logp[batch["labels"] != common.IGNORE].float())
    return torch.cat(out)


def check_precision(model, device, cpu: bool) -> list[dict]:
    """token_logps as the scripts run it on CUDA (bf16 autocast, the output layer in TF32) and with the
    output layer in true float32, each against everything in float32."""
    rows = []
    try:
        tokenizer = common.tiny_tokenizer()
        if model is None:
            model = shaped_model(TINY_SHAPE if cpu else QWEN25_05B, device)
        model.eval()
        samples = [common.tokenize_conversation(tokenizer, c) for c in common.builtin_sft("test", 16 if cpu else 128)]
        batches = sft.micro_batches(samples, 4096, True, tokenizer.pad_token_id)
        matmul_precision(device, "highest")
        exact = labelled_logps(model, batches, device, half=False)
        for head in ("high", "highest"):
            matmul_precision(device, head)
            lp = labelled_logps(model, batches, device, half=True)
            delta = (lp - exact).abs()
            rows.append({"check": "precision", "what": "token_logps, bf16 autocast vs float32", "fp32_matmul": head,
                         "tokens": exact.numel(), "mean_logp": float(exact.mean()), "mean_abs": float(delta.mean()),
                         "max_abs": float(delta.max()), "ok": float(delta.mean()) <= 0.01 and bool(torch.isfinite(lp).all())})  # fmt: skip
    except Exception as e:
        rows.append({"check": "precision", "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=6)})
    finally:
        matmul_precision(device, "high")
    return rows


# ───────────── report ─────────────


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        status = {True: "ok  ", False: "FAIL", None: "    "}[r.get("ok")]
        rest = ", ".join(f"{k}={fmt(v)}" for k, v in r.items() if k not in ("check", "ok", "trace", "error", "table"))
        lines.append(f"{status} {r['check']:<10} {rest}" + (f"\n      error: {r['error'][:600]}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--only", default="attention,scripts,speed,precision")
    parser.add_argument("--jobs", type=int, default=0, help="scripts run at once (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--all-scripts", action="store_true", help="on CPU too, every script (not one of each kind)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    only = set(args.only.split(","))
    t0 = time.time()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "flash_attn": common.flash_attn_varlen_func is not None,
           "torch_varlen_attn": common.varlen_attn is not None,
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}  # fmt: skip
    import transformers

    env["transformers"] = transformers.__version__
    rows = [{"check": "env", **env}]
    report = {"env": env, "tolerance": TOLERANCE, "rows": rows}

    def save():
        report["seconds"] = round(time.time() - t0, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    model = None
    if "attention" in only:
        rows += check_attention(device, FAMILIES)
        save()
    if "speed" in only:
        speed, model = check_speed(device, cpu)
        rows += speed
        save()
    if "precision" in only:
        rows += check_precision(model, device, cpu)
        save()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "scripts" in only:
        rows += check_scripts(device, fast=cpu and not args.all_scripts, jobs=args.jobs or (8 if device.type == "cuda" else 1))
    save()
    print(table(rows))
    failed = [r for r in rows if r.get("ok") is False]
    print(f"{len(failed)} of {sum(r.get('ok') is not None for r in rows)} checks failed; report: {args.out} "
          f"({report['seconds']} s)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
