"""Reliability across kills: a run SIGKILLed at random moments (start-up, steps, checkpoint writes) and
continued with --resume ends exactly where an uninterrupted run ends, for sft.py and for an RL script.

    python -m pytest tests/test_reliability.py
"""

from helpers import check_kill_anywhere
from test_grpo import tiny_reward_model

SFT = ["--model", "tiny", "--num-train", "64", "--num-eval", "2", "--batch-size", "8", "--lr", "3e-3",
       "--max-new-tokens", "2", "--warmup-steps", "1", "--max-steps", "12", "--save-every", "1"]  # fmt: skip


def test_sft_killed_at_ten_random_moments_ends_as_an_uninterrupted_run(tmp_path):
    check_kill_anywhere("sft.py", SFT, tmp_path, kills=10, seed=0)


def test_grpo_killed_at_ten_random_moments_ends_as_an_uninterrupted_run(tmp_path):
    grpo = ["--model", "tiny", "--num-train", "16", "--num-eval", "2", "--group-size", "4", "--prompts-per-step", "4",
            "--max-new-tokens", "6", "--overlong", "none", "--lr", "2e-3", "--max-steps", "8", "--save-every", "1",
            "--reward-model", tiny_reward_model(tmp_path / "rm")]  # fmt: skip
    check_kill_anywhere("grpo.py", grpo, tmp_path, kills=10, seed=1)
