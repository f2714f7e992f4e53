"""Chat templates with LongVA's label masks (spec §7): ``qwen_1_5`` (stage 2, inference) and ``plain`` (stage 1).

A conversation is LLaVA's list of turns ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` ("user" and
"assistant" are accepted too). Every ``<image>`` in a turn becomes one :data:`IMAGE_TOKEN` placeholder id; the
multimodal pipeline later expands each placeholder into that image's visual slots.

``trained`` is the label mask aligned with ``ids`` (LLaVA's ``labels != IGNORE``): token ``t`` is a training
target. The loader shifts once: ``targets[t] = ids[t + 1]``, ``loss_mask[t] = trained[t + 1]``.

qwen_1_5, worked example (byte-exact pieces; ``#`` = trained, ``.`` = masked)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      # . . . # #
    <|im_start|>user\\n<image>\\nWhat is it?<|im_end|>\\n              # . . . . # #
    <|im_start|>assistant\\nA cat.<|im_end|>\\n                        # . . # # #
    <|im_start|>user\\nColor?<|im_end|>\\n                             # . . . # #
    <|im_start|>assistant\\nGray.<|im_end|>\\n                         # . . # # #

i.e. trained = every ``<|im_start|>``, every ``<|im_end|>`` and the ``\\n`` after it, and the assistant answers;
role names, the ``\\n`` after a role, the system prompt, user text and image placeholders are masked.

plain (stage 1): ``<image>`` + caption + ``\\n``; only the placeholder is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lct_jax.data.skips import BadRecord
from lct_jax.data.tokenizer import IM_END, IM_START, Tokenizer

IMAGE_TOKEN = -200  # LLaVA's IMAGE_TOKEN_INDEX; never embedded
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Encoded:
    ids: np.ndarray  # int32[T], IMAGE_TOKEN at placeholders
    trained: np.ndarray  # bool[T], label mask aligned with ids

    @property
    def num_placeholders(self) -> int:
        return int((self.ids == IMAGE_TOKEN).sum())


def _turns(conversations) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord(
            "bad_conversation", f"conversations must be a non-empty list, got {conversations!r:.80}"
        )
    out = []
    for i, turn in enumerate(conversations):
        who = turn.get("from") if isinstance(turn, dict) else None
        role = _ROLES.get(who) if isinstance(who, str) else None  # a list or dict here is unhashable
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise BadRecord(
                "bad_conversation", f"turn {i} has from={turn!r:.80}; want from in {sorted(_ROLES)}"
            )
        if role == "system" and i != 0:
            raise BadRecord("bad_conversation", f"a system turn may only come first, found at turn {i}")
        out.append((role, value))
    if not any(r == "assistant" for r, _ in out):
        raise BadRecord("no_assistant_turn", f"no gpt/assistant turn among roles {[r for r, _ in out]}")
    return out


def _pieces(conversations, system: str, add_generation_prompt: bool) -> list[tuple[str, bool, bool]]:
    """(text, trained, special) pieces of the qwen_1_5 rendering, in order."""
    turns = _turns(conversations) if not add_generation_prompt else _turns_inference(conversations)
    if turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    out = [(IM_START, True, True), ("system", False, False), ("\n", False, False), (system, False, False)]
    out += [(IM_END, True, True), ("\n", True, False)]
    for role, value in turns:
        out += [(IM_START, True, True), (role, False, False), ("\n", False, False)]
        out += [(value, role == "assistant", False), (IM_END, True, True), ("\n", True, False)]
    if add_generation_prompt:
        out += [(IM_START, True, True), ("assistant", False, False), ("\n", False, False)]
    return out


def _turns_inference(conversations) -> list[tuple[str, str]]:
    # an inference prompt needs no assistant turn; validate roles only
    return _turns(list(conversations) + [{"from": "gpt", "value": ""}])[:-1]


def render_qwen_1_5(conversations, system: str = DEFAULT_SYSTEM, add_generation_prompt: bool = False) -> str:
    """The prompt string (``<image>`` kept literally), e.g. the spec §7 inference prompt."""
    return "".join(text for text, _, _ in _pieces(conversations, system, add_generation_prompt))


def _encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Encode text, turning each ``<image>`` into one IMAGE_TOKEN placeholder."""
    ids: list[int] = []
    for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN)
        if part:
            ids += tok.encode(part)
    return ids


def encode_qwen_1_5(
    conversations, tok: Tokenizer, system: str = DEFAULT_SYSTEM, add_generation_prompt: bool = False
) -> Encoded:
    """ids + label mask for the qwen_1_5 template (see the module docstring for exactly what is trained).

    ``add_generation_prompt=True`` builds an inference prompt (ending in ``<|im_start|>assistant\\n``) and does not
    require an assistant turn; training requires one (``BadRecord('no_assistant_turn')`` otherwise).
    """
    special = {IM_START: tok.im_start_id, IM_END: tok.im_end_id}
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained, is_special in _pieces(conversations, system, add_generation_prompt):
        piece = [special[text]] if is_special else _encode_text(tok, text)
        ids += piece
        trained += [is_trained and i != IMAGE_TOKEN for i in piece]
    return Encoded(np.asarray(ids, np.int32), np.asarray(trained, bool))


def encode_plain(conversations, tok: Tokenizer) -> Encoded:
    """Stage-1 "plain": ``<image>`` + caption + ``\\n``; the human text other than its placeholder is dropped."""
    turns = _turns(conversations)
    humans = [v for r, v in turns if r == "user"]
    answers = [v for r, v in turns if r == "assistant"]
    if len(humans) != 1 or len(answers) != 1 or turns[-1][0] != "assistant":
        raise BadRecord(
            "bad_conversation", f"plain template wants one human then one gpt turn, got {len(turns)}"
        )
    n = humans[0].count(IMAGE_PLACEHOLDER)
    if n != 1:
        raise BadRecord(
            "placeholder_mismatch", f"plain template wants exactly one <image> in the human turn, got {n}"
        )
    caption = _encode_text(tok, answers[0] + "\n")
    if IMAGE_TOKEN in caption:
        raise BadRecord("placeholder_mismatch", "plain template: <image> inside the caption")
    return Encoded(
        np.asarray([IMAGE_TOKEN] + caption, np.int32), np.asarray([False] + [True] * len(caption), bool)
    )


TEMPLATES = {"qwen_1_5": encode_qwen_1_5, "plain": encode_plain}
