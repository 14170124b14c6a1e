"""The template zoo: assistant-only masks under the chat templates users bring (written here as Jinja, with
tokenizers built in code), on a multi-turn conversation whose user repeats the assistant's answer, with
answers that start after a space (SentencePiece "▁7", byte-level "Ġ7") and with thinking blocks.

    python -m pytest tests/test_templates.py
"""

import pytest
from helpers import labelled_runs

import common

REPEAT = [
    {"role": "user", "content": "Which is prime, 4 or 7?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "You said 7. Why 7?"},
    {"role": "assistant", "content": "7 has no divisors but 1 and 7."},
]

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    + CHATML
)
# Qwen3: reasoning is kept only in answers after the last user message, earlier answers lose it
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{ '<|im_start|>assistant\\n' + content }}{%- endif %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31 = (
    "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: 26 Jul 2024\\n\\n<|eot_id|>' }}"
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + '[/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
DEEPSEEK = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def byte_bpe(specials: list[str], bos: str, eos: str, template: str):
    """Byte-level BPE with the merges "Ġ" + letter/digit, so " 7" is one token that starts at the space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", c) for c in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    vocab = {t: i for i, t in enumerate(specials + alphabet + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=specials[0])
    fast.chat_template = template
    return fast


def sentencepiece(template: str):
    """A Llama-2 style SentencePiece tokenizer (Metaspace "▁", BPE with "▁" + character merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    specials = ["<unk>", "<s>", "</s>"]
    merges = [("▁", c) for c in chars]
    vocab = {t: i for i, t in enumerate(specials + ["▁"] + chars + ["▁" + c for c in chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    return fast


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ZOO = {  # name: (tokenizer, the text that ends each trained answer)
    "chatml": (lambda: byte_bpe(CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", CHATML), "<|im_end|>"),
    "qwen2.5": (lambda: byte_bpe(CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", QWEN25), "<|im_end|>"),
    "qwen3": (lambda: byte_bpe(CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", QWEN3), "<|im_end|>"),
    "llama3.1": (lambda: byte_bpe(["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                   "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", LLAMA31), "<|eot_id|>"),  # fmt: skip
    "gemma": (lambda: byte_bpe(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", GEMMA),
              "<end_of_turn>"),
    "phi3": (lambda: byte_bpe(["<|endoftext|>", "<s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<s>",
                              "<|endoftext|>", PHI3), "<|end|>"),  # fmt: skip
    "mistral": (lambda: byte_bpe(["<unk>", "<s>", "</s>"], "<s>", "</s>", MISTRAL), "</s>"),
    "llama2-sentencepiece": (lambda: sentencepiece(LLAMA2), " </s>"),
    "deepseek": (lambda: byte_bpe(["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"], "<｜begin▁of▁sentence｜>",
                                  "<｜end▁of▁sentence｜>", DEEPSEEK), "<｜end▁of▁sentence｜>"),  # fmt: skip
}


@pytest.mark.parametrize("name", ZOO)
def test_each_answer_and_its_end_of_turn_are_trained_and_nothing_the_user_repeats(name):
    make, eot = ZOO[name]
    tok = make()
    sample = common.tokenize_conversation(tok, REPEAT)
    runs = labelled_runs(tok, sample)
    # the first answer token is trained even where it carries the space before the answer ("Ġ7", "▁7")
    assert [r.strip() for r in runs] == [m["content"] + eot for m in REPEAT if m["role"] == "assistant"]
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(REPEAT, tokenize=False)


@pytest.mark.parametrize("name", ["mistral", "deepseek", "llama2-sentencepiece"])
def test_a_token_holding_the_space_before_the_answer_is_trained(name):
    tok = ZOO[name][0]()
    sample = common.tokenize_conversation(tok, REPEAT[:2])
    first = next(t for t, label in zip(sample["input_ids"], sample["labels"]) if label != common.IGNORE)
    assert tok.convert_ids_to_tokens(first) in ("Ġ7", "▁7")


@pytest.mark.parametrize("name", ZOO)
def test_the_end_of_turn_token_is_a_stop_token(name):
    make, eot = ZOO[name]
    assert common.end_of_turn_token(make()) == eot.strip()


def test_qwen3_trains_the_last_answers_reasoning_and_what_earlier_answers_render():
    tok = ZOO["qwen3"][0]()
    conv = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 4+3?"},
        {"role": "assistant", "content": "<think>\n4 and 3 make 7\n</think>\n\n7"},
    ]
    runs = labelled_runs(tok, common.tokenize_conversation(tok, conv))
    assert runs == ["4<|im_end|>", "<think>\n4 and 3 make 7\n</think>\n\n7<|im_end|>"]


def test_a_conversation_that_starts_with_the_assistant_masks_each_turn():
    """Qwen2.5's default system prompt holds the first answer's text: the answer is not looked for there."""
    tok = ZOO["qwen2.5"][0]()
    conv = [{"role": "assistant", "content": "a helpful assistant."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]  # fmt: skip
    sample = common.tokenize_conversation(tok, conv)
    assert labelled_runs(tok, sample) == ["a helpful assistant.<|im_end|>", "4<|im_end|>"]
    assert "You are a helpful assistant." in tok.decode(sample["input_ids"])


def test_gemma_without_a_system_role_is_a_template_error_not_a_wrong_mask():
    tok = ZOO["gemma"][0]()
    with pytest.raises(Exception, match="System role not supported"):
        common.tokenize_conversation(tok, [{"role": "system", "content": "be brief"}] + REPEAT)


@pytest.mark.parametrize("answer,trained", [("", "<|im_end|>"), ("\n\n\n", "<|im_end|>"), ("  7  ", " 7  <|im_end|>")])
def test_empty_blank_and_padded_answers_train_their_text_and_the_end_of_turn(answer, trained):
    """Blank answers train the end of turn alone; an answer's own trailing blanks come before <|im_end|>,
    so they are trained too, and " 7" is one token ("Ġ7") that overlaps the answer."""
    tok = ZOO["chatml"][0]()
    sample = common.tokenize_conversation(tok, common.as_messages("2+2?", answer))
    assert labelled_runs(tok, sample) == [trained]
