"""Shared fixtures: tokenizers built in code (ChatML and Llama-3 style), the tiny random Llama, and a
tiny model fine-tuned on the built-in task."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the workers share the cores instead of each taking all
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# SmolLM2's template: a default system prompt when the conversation has none
CHATML_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(specials, bos, eos, template, add_bos=False):
    """A byte-level tokenizer (one token per byte) with the given special tokens and chat template.
    add_bos: the tokenizer itself prepends BOS when asked for special tokens, as Llama-3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=specials[0])
    fast.chat_template = template
    return fast


@pytest.fixture
def chatml():
    return common.tiny_tokenizer()


@pytest.fixture
def chatml_system():
    return byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", CHATML_DEFAULT_SYSTEM)


@pytest.fixture
def llama3():
    specials = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return byte_tokenizer(specials, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE, add_bos=True)


@pytest.fixture
def tiny(chatml):
    common.register_attention()
    model = common.load_model("tiny", chatml)
    model.eval()
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tuned_tiny(tmp_path_factory):
    """A tiny model fine-tuned on the built-in task (its directory): answers in the format and peaked
    distributions, worth critiquing (test_cai) or distilling (test_distill). Tests only read it."""
    import sft

    out = tmp_path_factory.mktemp("tuned_tiny")
    return sft.main(sft.Args(model="tiny", num_train=64, num_eval=4, max_steps=30, batch_size=8, lr=3e-3, warmup_steps=1,
                             max_new_tokens=4, save_every=0, output_dir=str(out)))  # fmt: skip
