"""tests/gpu_check.py in its CPU mode: the same checks as on a GPU machine but the device calls, on tiny
shapes, so the GPU check cannot rot before a GPU is at hand.

    python -m pytest tests/test_gpu_check.py
"""

import json
import subprocess
import sys

from helpers import ENV, ROOT


def test_the_gpu_check_runs_every_section_on_cpu_and_passes(tmp_path):
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "tests/gpu_check.py", "--device", "cpu", "--out", str(report)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    by_check = {}
    for row in rows:
        by_check.setdefault(row["check"], []).append(row)
    from zoo import FAMILIES

    assert {(r["family"], r["precision"], r["layout"]) for r in by_check["attention"]} == {
        (f, p, lay) for f in FAMILIES for p in ("float32", "bf16") for lay in ("packed", "shared prompt")}
    assert {r["script"] for r in by_check["script"]} == {"sft", "dpo", "grpo", "merge"}
    assert {r["what"] for r in by_check["speed"]} == {"sft", "dpo, shared prompt", "dpo, prompt in both documents", "generate"}
    assert len(by_check["precision"]) == 2
    assert all(r["ok"] for c in ("attention", "script", "speed", "precision") for r in by_check[c])
    assert all(r["tokens_per_s"] > 0 for r in by_check["speed"])
    assert "ok   attention  family=llama" in r.stdout  # the printed table
