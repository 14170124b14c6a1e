"""merge.py: SLERP (norm, endpoints, parallel and anti-parallel fallbacks), TIES and DARE on hand-made
tensors, DARE's expectation, linear at α = 0 / 1 bit for bit, merges of tiny checkpoints (single file,
sharded, tied embeddings) that load in transformers and generate, the sweep, atomic output, bad input.

    python -m pytest tests/test_merge.py
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import merge


def test_slerp_keeps_the_norm_of_equal_norm_inputs_and_hits_the_endpoints():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    b = b * a.norm() / b.norm()
    for t in (0.1, 0.5, 0.9):
        assert merge.slerp(a, b, t).norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    assert torch.equal(merge.slerp(a, b, 0.0), a) and torch.equal(merge.slerp(a, b, 1.0), b)
    # hand-worked: orthogonal unit vectors, t = ½ → (e1 + e2)/√2
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(merge.slerp(e1, e2, 0.5), torch.tensor([1.0, 1.0]) / 2**0.5)
    # nearly parallel and anti-parallel: linear interpolation, finite
    torch.testing.assert_close(merge.slerp(a, 2 * a, 0.5), 1.5 * a)
    torch.testing.assert_close(merge.slerp(a, -a, 0.25), 0.5 * a)


def test_ties_on_a_hand_worked_example():
    d1 = torch.tensor([4.0, -1.0, 2.0, 0.5])
    d2 = torch.tensor([-3.0, 2.0, 1.0, -0.1])
    d3 = torch.tensor([1.0, -5.0, -0.2, 0.3])
    # density ½ keeps 2 of 4: d1 → [4, 0, 2, 0], d2 → [−3, 2, 0, 0], d3 → [0, −5, 0, 0.3]... (top-2 by |·|)
    assert merge.trim(d3, 0.5).tolist() == [1.0, -5.0, 0.0, 0.0]
    # sums: [2, −3, 2, 0] → signs [+, −, +, 0]; agreeing: c0 {4, 1} → 2.5, c1 {−5} → −5, c2 {2} → 2, c3 none → 0
    assert merge.ties([d1, d2, d3], 0.5, [1.0, 1.0, 1.0]).tolist() == [2.5, -5.0, 2.0, 0.0]
    assert merge.trim(d1, 1.0).tolist() == d1.tolist() and merge.trim(d1, 0.0).tolist() == [0.0] * 4


def test_dare_drops_and_rescales_and_keeps_the_expected_task_vector():
    delta = torch.linspace(-1, 1, 200)
    out = merge.dare(delta, 0.75, torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], delta[kept] * 4)  # survivors × 1/(1 − p)
    assert 0.15 < kept.float().mean().item() < 0.35
    mean = torch.stack([merge.dare(delta, 0.75, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(0)
    assert (mean - delta).abs().max().item() < 0.12  # E[dare(δ)] = δ (4000 seeds: se ≈ 0.027 at |δ| = 1)
    assert torch.equal(merge.dare(delta, 0.0, torch.Generator()), delta)


def test_linear_at_alpha_0_and_1_returns_the_inputs_bit_for_bit():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    a[0, 0] = -0.0
    assert torch.equal(merge.linear(a, b, 0.0), a) and torch.equal(merge.linear(a, b, 1.0), b)
    torch.testing.assert_close(merge.linear(a, b, 0.25), 0.75 * a + 0.25 * b)


# ───────────── checkpoints ─────────────


def save_tiny(path, seed, shard=None, tied=True):
    tok = common.tiny_tokenizer()
    model = common.tiny_model(tok, seed=seed)
    model.config.tie_word_embeddings = tied
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(path, max_shard_size=shard or "5GB")
    tok.save_pretrained(path)
    return str(path)


def weights(path):
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_merges_load_in_transformers_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    base, a, b = (save_tiny(tmp_path / n, s) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    for method in ("linear", "slerp", "task-arithmetic", "ties", "dare", "dare-ties"):
        models = [a] if method in ("linear", "slerp") else [a, b]
        out = merge.main(merge.Args(method=method, models=models, base=base, out=str(tmp_path / method)))
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = common.load_tokenizer(out)
        text = common.generate(model, tok, ["hi"], max_new_tokens=4)[0]
        assert len(text["completion_ids"]) > 0
    wa, wb, wbase = weights(a), weights(b), weights(base)
    w = weights(str(tmp_path / "task-arithmetic"))
    for k in wbase:
        torch.testing.assert_close(w[k], wa[k] + wb[k] - wbase[k], atol=1e-6, rtol=1e-6)
    assert all(
        torch.equal(weights(merge.main(merge.Args(models=[a], base=base, alpha=0.0, out=str(tmp_path / "z"))))[k], wa[k])
        for k in wa
    )


def test_sharded_inputs_sharded_output_and_tied_against_untied_embeddings(tmp_path):
    base = save_tiny(tmp_path / "base", 0, shard="50KB")
    assert os.path.exists(os.path.join(base, "model.safetensors.index.json"))
    untied = save_tiny(tmp_path / "untied", 1, tied=False)
    out = merge.main(merge.Args(models=[untied], base=base, alpha=0.5, shard_mb=0, out=str(tmp_path / "m")))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1  # one tensor per shard at shard_mb = 0
    w, wb, wu = weights(out), weights(base), weights(untied)
    assert set(w) == set(wb) | {"lm_head.weight"}  # an untied input: the merge keeps an output layer of its own
    torch.testing.assert_close(w["lm_head.weight"], 0.5 * (wu["lm_head.weight"] + wb["model.embed_tokens.weight"]))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False


def test_bad_inputs_are_clear_errors_and_pickles_are_never_loaded(tmp_path, monkeypatch):
    base = save_tiny(tmp_path / "base", 0)
    with pytest.raises(FileNotFoundError, match="nope: no such checkpoint"):
        merge.main(merge.Args(models=[str(tmp_path / "nope")], base=base, out=str(tmp_path / "o")))
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    (pickle_dir / "config.json").write_text("{}")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(ValueError, match="only pickle files \\(pytorch_model.bin\\), which are never loaded"):
        merge.main(merge.Args(models=[str(pickle_dir)], base=base, out=str(tmp_path / "o")))
    tok = common.tiny_tokenizer()
    wide = common.tiny_model(tok, hidden=32)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="tensor 'model.embed_tokens.weight' has shape"):
        merge.main(merge.Args(models=[str(tmp_path / "wide")], base=base, out=str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o")


def test_an_interrupted_merge_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    base, a = save_tiny(tmp_path / "base", 0), save_tiny(tmp_path / "a", 1)
    out = merge.main(merge.Args(models=[a], base=base, alpha=0.0, out=str(tmp_path / "m")))
    before = weights(out)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        merge.main(merge.Args(models=[a], base=base, alpha=1.0, out=out))
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["a", "base", "m"]  # and no half-written directory is left behind


@pytest.mark.parametrize("matplotlib_installed", [True, False])
def test_sweep_writes_the_alignment_tax_table_and_the_plot_when_matplotlib_is_there(tmp_path, monkeypatch, capsys,
                                                                                    matplotlib_installed):  # fmt: skip
    """Without matplotlib (the README's install commands do not bring it) the sweep still writes its
    JSON and says in one line why there is no plot."""
    if matplotlib_installed:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    base, a = save_tiny(tmp_path / "base", 0), save_tiny(tmp_path / "a", 1)
    out = merge.main(
        merge.Args(models=[a], base=base, sweep=[0.0, 0.5, 1.0], num_eval=2, max_new_tokens=2, out=str(tmp_path / "s"))
    )
    with open(os.path.join(out, "sweep.json")) as f:
        rows = json.load(f)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert all(r["prose_nll"] > 0 for r in rows) and rows[0]["prose_nll"] != rows[2]["prose_nll"]
    assert os.path.exists(os.path.join(out, "sweep.png")) == matplotlib_installed
    assert ("matplotlib is not installed" in capsys.readouterr().out) != matplotlib_installed


def test_merge_never_deletes_a_directory_it_did_not_write(tmp_path):
    base, a = save_tiny(tmp_path / "base", 0), save_tiny(tmp_path / "a", 1)
    foreign = tmp_path / "work"
    (foreign / "notes").mkdir(parents=True)
    (foreign / "notes" / "thesis.tex").write_text("\\section{Results}")
    with pytest.raises(FileExistsError, match="holds files merge.py did not write"):
        merge.main(merge.Args(models=[a], base=base, out=str(foreign)))
    assert (foreign / "notes" / "thesis.tex").read_text() == "\\section{Results}"
    with pytest.raises(FileExistsError, match="holds files merge.py did not write"):  # an input run is foreign too
        merge.main(merge.Args(models=[a], base=base, out=a))
    assert os.path.exists(os.path.join(a, "model.safetensors"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        merge.main(merge.Args(models=[a], base=base, out=str(tmp_path / "file")))
    assert sorted(os.listdir(tmp_path)) == ["a", "base", "file", "work"]  # no stray .old / .tmp
    out = merge.main(merge.Args(models=[a], base=base, out=str(tmp_path / "m")))  # a previous merge is replaced
    merge.main(merge.Args(models=[a], base=base, alpha=0.2, out=out))
    merge.main(merge.Args(models=[a], base=base, out=str(foreign), overwrite=True))  # asked for explicitly
    assert not (foreign / "notes").exists() and (foreign / "merge.json").exists()


@pytest.mark.parametrize("bad", [{"method": "dare", "drop_p": 1.0}, {"method": "dare", "drop_p": -0.5},
                                 {"method": "ties", "density": 0.0}, {"method": "ties", "density": 1.5}])  # fmt: skip
def test_out_of_range_drop_rate_or_density_is_an_error_before_anything_is_written(tmp_path, bad):
    base, a = save_tiny(tmp_path / "base", 0), save_tiny(tmp_path / "a", 1)
    with pytest.raises(ValueError, match="drop-p|density"):
        merge.main(merge.Args(models=[a], base=base, out=str(tmp_path / "m"), **bad))
    assert not (tmp_path / "m").exists()
