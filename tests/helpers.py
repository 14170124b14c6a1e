"""Process helpers for the script tests: run a script (under torchrun for nproc > 1), or start it and
SIGKILL it as soon as its first checkpoint is complete."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
IGNORE = -100  # common.IGNORE: the label of an untrained token  # two processes on two cores


def run_script(script: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(launch + [script] + args, cwd=ROOT, env=ENV, capture_output=True, text=True)


def kill_after_first_checkpoint(script: str, args: list[str], out_dir: str) -> None:
    proc = subprocess.Popen([sys.executable, script] + args + ["--output-dir", out_dir], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not os.path.exists(os.path.join(out_dir, "latest")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out_dir, "model.safetensors")), "the run finished before the kill"


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def synthetic_preferences(path, n: int, seed: int) -> str:
    """A preference the tiny model learns in a few steps: the chosen answer agrees ("yes, w"), the
    rejected one refuses ("no. w"), for a random word w."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice("abcdefgh") for _ in range(4))
            f.write(json.dumps({"prompt": f"say {w}", "chosen": f"yes, {w}", "rejected": f"no. {w}"}) + "\n")
    return str(path)


def assert_same_weights(dir_a: str, dir_b: str, atol: float, mean_atol: float | None = None) -> None:
    import torch
    from safetensors.torch import load_file

    w1, w2 = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=atol, rtol=0)
    if mean_atol is not None:
        assert max((w1[k] - w2[k]).abs().mean().item() for k in w1) < mean_atol


def check_two_processes_match_one(script: str, args: list[str], tmp_path, lr: float) -> None:
    """The same global batch on 1 and on 2 gloo processes gives the same weights. Only the order of float
    additions differs; Adam divides by √v, so rounding in a near-zero gradient can move a weight by a
    few % of one step: allow 5% of a step (lr) per weight, and 1e-7 on average."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, n in ((one, 1), (two, 2)):
        r = run_script(script, args + ["--output-dir", out], nproc=n)
        assert r.returncode == 0, r.stderr[-8000:]  # room for a failing rank's own lines above torchrun's summary
    assert_same_weights(one, two, atol=0.05 * lr, mean_atol=1e-7)


def check_resume_matches_uninterrupted(script: str, args: list[str], tmp_path, steps: int, key: str = "loss") -> None:
    """A run SIGKILLed after its first checkpoint and resumed ends with the weights and the metrics
    (one line per step, none twice) of a run never interrupted."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert run_script(script, args + ["--output-dir", full]).returncode == 0
    kill_after_first_checkpoint(script, args, cut)
    r = run_script(script, args + ["--output-dir", cut, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(full, cut, atol=1e-6)
    assert [m["step"] for m in read_metrics(cut) if key in m] == list(range(1, steps + 1))


def check_kill_anywhere(script: str, args: list[str], tmp_path, kills: int = 10, seed: int = 0) -> list[str]:
    """SIGKILL a run at `kills` random moments (uniform over an uninterrupted run's wall time: during
    start-up, steps and checkpoint writes alike), continuing it each time as a user would — `--resume`
    when a complete checkpoint exists, else `--overwrite` — and finally let it finish. It must end with
    the weights and the metrics (every step once, the same values) of the uninterrupted run. Returns
    what each kill interrupted, for the assertion message."""
    import torch  # noqa: F401
    from safetensors.torch import load_file

    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    t0 = time.time()
    r = run_script(script, args + ["--output-dir", full])
    assert r.returncode == 0, r.stderr[-2000:]
    wall = time.time() - t0
    rng, seen = random.Random(seed), []

    def next_args():
        done = os.path.isdir(cut) and any(os.path.exists(os.path.join(p, "complete")) for p in glob.glob(os.path.join(cut, "checkpoint-*")))
        return args + ["--output-dir", cut] + (["--resume"] if done else ["--overwrite"])  # fmt: skip

    for _ in range(kills):
        if os.path.exists(os.path.join(cut, "model.safetensors")):
            break
        launch = next_args()
        proc = subprocess.Popen([sys.executable, script] + launch, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(rng.uniform(0.5, wall))
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        assert proc.returncode in (-signal.SIGKILL, 0), err[-2000:]
        steps = [p for p in glob.glob(os.path.join(cut, "checkpoint-*"))]
        seen.append(f"{launch[-1]} -> {sorted(os.path.basename(p) for p in steps)}")
    r = run_script(script, next_args())
    assert r.returncode == 0, r.stderr[-2000:] + "\n" + "\n".join(seen)
    w_full, w_cut = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], atol=1e-6, rtol=0, msg=lambda m: m + "\n" + "\n".join(seen))
    a, b = [m for m in read_metrics(full) if "loss" in m], [m for m in read_metrics(cut) if "loss" in m]
    assert [m["step"] for m in b] == [m["step"] for m in a], "\n".join(seen)
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    return seen


def labelled_runs(tok, sample):
    """Decoded text of each maximal run of consecutive labelled tokens."""
    runs, cur = [], []
    for t, l in zip(sample["input_ids"], sample["labels"]):
        if l != IGNORE:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r) for r in runs]


def tiny_reward_model(path):
    """A random sequence-classification model: continuous rewards, so every group has a signal."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    import common

    tok = common.tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
