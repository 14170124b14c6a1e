"""Process helpers for the script tests: run a script (under torchrun for nproc > 1), or start it and
SIGKILL it as soon as its first checkpoint is complete."""

import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores


def run_script(script: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
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
        assert r.returncode == 0, r.stderr[-2000:]
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
