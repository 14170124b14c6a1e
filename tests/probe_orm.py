"""Why the outcome RM does not learn the built-in pairs: what the backbone's last-token features hold.

    python tests/probe_orm.py MODEL_DIR [--train 1024]

A Bradley-Terry reward model with a linear head on frozen features is logistic regression on the
difference of the two answers' features, P(w ≻ l) = σ(θ·(h_w − h_l)). This fits that probe on the
hidden state of the last token (what rm.py's head reads) at several depths of MODEL_DIR, with its L2
weight chosen on a quarter of the training pairs, and reports held-out pairwise accuracy on the
test-split problems validate.py reports (256–511). It also reports the language model's own
verdict: does it give the chosen answer a higher log-likelihood than the rejected one? If the probe is
near chance the answer's correctness is not linearly present where the head reads; the ORM has to
learn to put it there, which is the slow part. Not part of the test run (7.5 minutes on 2 cores for 512 + 256 pairs).
"""

import json
import sys
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import common  # noqa: E402


@torch.no_grad()
def features(model, tokenizer, rows: list[dict], layers: list[int], batch: int = 16) -> tuple[dict, torch.Tensor]:
    """Per answer (chosen, rejected of each row): last-token hidden state at each layer -> {layer: (n, 2, H)},
    and the answer's summed log-likelihood -> (n, 2)."""
    caught = {}
    blocks = model.model.layers
    for k in layers[:-1]:  # hidden_states[k] in transformers' convention: the output of block k − 1
        blocks[k - 1].register_forward_hook(lambda mod, inp, out, k=k: caught.__setitem__(k, out[0] if isinstance(out, tuple) else out))
    docs = [common.tokenize_conversation(tokenizer, common.as_messages(r["prompt"], a)) for r in rows for a in (r["chosen"], r["rejected"])]
    feats, loglik = {k: [] for k in layers}, []
    for i in common.progress(range(0, len(docs), batch), "probe: forward"):
        b = common.collate_padded(docs[i : i + batch], tokenizer.pad_token_id, side="right")
        caught[layers[-1]] = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logp = model.lm_head(caught[layers[-1]])[:, :-1].log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
        loglik.append((logp * (b["labels"][:, 1:] != common.IGNORE)).sum(1))
        last = b["attention_mask"].sum(1) - 1
        for k in layers:
            feats[k].append(caught[k][torch.arange(len(last)), last])
    return {k: torch.cat(v).view(len(rows), 2, -1) for k, v in feats.items()}, torch.cat(loglik).view(len(rows), 2)


def fit_probe(d: torch.Tensor, l2: float) -> torch.Tensor:
    """θ minimising mean −log σ(θ·d) + l2·|θ|² (d: chosen minus rejected features, standardised)."""
    theta = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(d @ theta)).mean() + l2 * theta.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def main(model_dir: str, n_train: int) -> None:
    tokenizer = common.load_tokenizer(model_dir)
    model = common.load_model(model_dir, tokenizer).eval()
    n_layers = model.config.num_hidden_layers
    layers = [n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers]  # hidden_states[n_layers]: after the final norm
    train = common.builtin_preferences("train", n_train)
    test = common.builtin_preferences("test", 512)[256:]  # validate.py's reported problems
    f_train, ll_train = features(model, tokenizer, train, layers)
    f_test, ll_test = features(model, tokenizer, test, layers)
    result = {"model": model_dir, "train_pairs": n_train, "test_pairs": len(test),
              "loglik_accuracy_test": (ll_test[:, 0] > ll_test[:, 1]).double().mean().item(), "probe": {}}
    fit, val = slice(0, 3 * n_train // 4), slice(3 * n_train // 4, n_train)
    for k in layers:
        d_train = (f_train[k][:, 0] - f_train[k][:, 1]).double()
        d_test = (f_test[k][:, 0] - f_test[k][:, 1]).double()
        scale = d_train[fit].std(0) + 1e-6  # no centring: a pair's difference has no offset
        d_train, d_test = d_train / scale, d_test / scale
        accs = {l2: ((d_train[val] @ fit_probe(d_train[fit], l2)) > 0).double().mean().item() for l2 in (1e-4, 1e-3, 1e-2, 1e-1)}
        l2 = max(accs, key=accs.get)
        theta = fit_probe(d_train, l2)
        result["probe"][f"layer {k}/{n_layers}"] = {
            "l2": l2, "val_accuracy": accs[l2], "train_accuracy": ((d_train @ theta) > 0).double().mean().item(),
            "test_accuracy": ((d_test @ theta) > 0).double().mean().item()}
        print(k, result["probe"][f"layer {k}/{n_layers}"], flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(argv[0], int(argv[argv.index("--train") + 1]) if "--train" in argv else 1024)
