"""Process helpers for the script tests: run a script (under torchrun for nproc > 1), or start it and
SIGKILL it as soon as its first checkpoint is complete."""

import os
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
