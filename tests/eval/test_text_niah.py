"""Text NIAH: the worked layout, the period snap, predictions equal transformers on an imported HF checkpoint (8-device
ring), LongVA checkpoints score through their LM, one-line errors."""

import re

import numpy as np
import pytest
import torch

from lct_jax.convert.__main__ import import_hf
from lct_jax.convert.checkpoint import restore_params_numpy, save_model_checkpoint
from lct_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from lct_jax.eval import text_niah as tn
from lct_jax.eval.__main__ import main as eval_main
from lct_jax.model.longva import PRESETS
from lct_jax.sharding import make_mesh


def test_worked_example_layout(tmp_path):
    """The module docstring's example, literally."""
    tok = ByteTokenizer()
    (tmp_path / "f.txt").write_text("aaaa. bbbb. cccc. dd and more that is cut away")
    hay = tn.filler_tokens(tok, 20, tmp_path / "f.txt")
    assert tok.decode(hay) == "aaaa. bbbb. cccc. dd"
    assert tn.needle_position(hay, 0.3, tn.period_id(tok)) == 11  # int(0.3 * 20) = 6 -> period at 10 -> 11
    lay = tn.text_layout(tok, hay, 0.3, 1234567)
    needle = "\nThe special magic Singapore number is: 1234567.\n"
    question = (
        "</book>.\n Based on the content of the book, Question: What is the special magic Singapore number? "
        "Answer: The special magic Singapore number is: "
    )
    text = "This is a very long story book: <book>" + "aaaa. bbbb." + needle + " cccc. dd" + question
    assert (len(tok.encode(text[:38])), len(needle), len(question)) == (38, 49, 145)
    np.testing.assert_array_equal(lay.ids, tok.encode(text + "1234567"))
    assert lay.length == 259 and lay.answer_start == 252
    np.testing.assert_array_equal(lay.scored_positions, range(251, 258))
    np.testing.assert_array_equal(lay.answer, tok.encode("1234567"))


def test_needle_position_snaps_forward_to_a_period():
    tok = ByteTokenizer()
    period = tn.period_id(tok)
    hay = np.asarray(tok.encode("ab. cd. ef"), np.int32)
    assert tn.needle_position(hay, 0.0, period) == 0  # the very start, even though no period precedes it
    assert tn.needle_position(hay, 0.1, period) == 3  # int(1.0) = 1 -> period at 2
    assert tn.needle_position(hay, 0.2, period) == 3  # int(2.0) = 2 is the period itself
    assert tn.needle_position(hay, 0.5, period) == 7
    assert (
        tn.needle_position(hay, 0.8, period) == 10 and tn.needle_position(hay, 1.0, period) == 10
    )  # no period
    assert tn.period_id(load_tokenizer("qwen")) == 13  # Qwen2's own '.' (not LLaMA's 29889 / 869)
    numbers = tn.sample_numbers(5, seed=0)
    assert numbers == tn.sample_numbers(5, seed=0) and all(10**6 <= n < 10**7 for n in numbers)
    built_in = tok.decode(tn.filler_tokens(tok, 300))
    assert len(built_in) == 300 and built_in.count(". ") >= 4


def test_predictions_equal_transformers_on_an_imported_checkpoint(hf_qwen2, tmp_path):
    hf_dir, torch_model = hf_qwen2(vocab_size=300)  # covers the byte tokenizer's 259 ids
    ckpt = import_hf(str(hf_dir), str(tmp_path / "imported"))
    tok = ByteTokenizer()
    results = tn.run_text_niah(ckpt, tmp_path / "out", lengths=[40, 80], depths=[0.0, 0.5, 1.0], samples=2,
                               distractors=1, tokenizer="byte", mesh=make_mesh(1, 8, 1), bucket=128,
                               dtype="float32", progress=False)  # the import computes in bf16 by default  # fmt: skip
    hay = tn.filler_tokens(tok, 80)
    numbers, others = tn.sample_numbers(2, seed=0), tn.distractor_needles(1, seed=0)
    for cell in results["cells"]:
        layouts = tn.cell_layouts(tok, hay[: cell["length"]], cell["depth"], numbers, others, seed=0)
        for s, lay in zip(cell["samples"], layouts, strict=True):
            with torch.no_grad():
                logits = torch_model(torch.from_numpy(lay.ids.astype(np.int64))[None]).logits[0]
            want = logits[lay.scored_positions].argmax(-1).numpy()
            assert s["predicted"] == want.tolist() and s["expected"] == lay.answer.tolist()
            assert s["correct"] == bool((want == lay.answer).all())
            assert s["length"] == lay.length and s["padded_length"] == 384  # both lengths: one compile
            assert (lay.ids == tn.period_id(tok)).sum() > (hay[: cell["length"]] == tn.period_id(tok)).sum()


def test_longva_checkpoint_scores_through_its_lm(tiny_vniah, tmp_path):
    """A stage-2 checkpoint and its LM saved alone as a stage-0 checkpoint give the same predictions."""
    params = restore_params_numpy(tiny_vniah["ckpt"] / "params")
    cfg = PRESETS["tiny"].replace(dtype="float32")
    lm_ckpt = save_model_checkpoint(tmp_path / "lm", "qwen2", cfg.text, params["lm"])
    kw = dict(lengths=[64], depths=[0.0, 1.0], samples=2, tokenizer="byte", progress=False)
    a = tn.run_text_niah(tiny_vniah["ckpt"], tmp_path / "a", **kw)
    b = tn.run_text_niah(lm_ckpt, tmp_path / "b", **kw)
    pred = lambda r: [s["predicted"] for c in r["cells"] for s in c["samples"]]  # noqa: E731
    assert pred(a) == pred(b) and len(pred(a)) == 4
    assert a["config"]["model"]["kind"] == "longva" and b["config"]["model"]["kind"] == "qwen2"


def _cli(argv):
    return eval_main(["text-niah", *argv])


def test_user_errors_are_one_line(tiny_vniah, tmp_path, capsys):
    base = [
        "--ckpt",
        str(tiny_vniah["ckpt"]),
        "--out",
        str(tmp_path / "o"),
        "--lengths",
        "32",
        "--no-progress",
    ]
    cases = [
        (["--tokenizer", str(tmp_path / "none.json")], "no tokenizer.json"),
        (["--tokenizer", "byte", "--filler", str(tmp_path / "none.txt")], "cannot read it as UTF-8 text"),
        (["--tokenizer", "byte", "--distractors", "9"], "--distractors 9 in 0..6"),
        ([], "no tokenizer found for"),  # a bare model checkpoint names none
    ]
    for extra, message in cases:
        assert _cli(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and re.search(re.escape(message), err), err


@pytest.mark.parametrize(
    "spec, want", [("32768:131072:32768", [32768, 65536, 98304, 131072]), ("64,32", [32, 64])]
)
def test_length_grids(spec, want):
    assert tn.parse_grid(spec, int) == want
    assert tn.parse_grid("0:1:0.1") == [round(0.1 * i, 6) for i in range(11)]
