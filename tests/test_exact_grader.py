"""``--eval-grader exact`` does not depend on how the tokenizer joins pieces when it decodes."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_gopd.testing import make_tiny_tokenizer
from megatron_gopd.trainer.stages import GOPDTrainer


def _spaced_tokenizer(path):
    """A character-level tokenizer without a decoder: ``decode`` puts a space between pieces, as
    word-level tokenizers do (``[1, 8, 0, 1]`` -> ``'1 8 0 1'``)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", *"0123456789"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return fast


def _grader(tokenizer):
    return SimpleNamespace(
        cfg=SimpleNamespace(eval=SimpleNamespace(grader="exact")), tokenizer=tokenizer
    )


def _decoded(tokenizer, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_exact_grader_with_a_tokenizer_that_decodes_with_spaces(tmp_path):
    tok = _spaced_tokenizer(tmp_path / "spaced")
    response = _decoded(tok, "1801")
    assert response == "1 8 0 1"  # the premise: the response as the trainer decodes it
    grader = _grader(tok)
    assert GOPDTrainer._correct(grader, response, "1801")
    assert not GOPDTrainer._correct(grader, _decoded(tok, "1802"), "1801")
    assert not GOPDTrainer._correct(grader, _decoded(tok, "180"), "1801")


def test_exact_grader_with_a_lossless_tokenizer(tmp_path):
    """Where decoding is lossless, the comparison is exact (up to surrounding whitespace): a
    space inside the response is still a different answer."""
    tok = make_tiny_tokenizer(tmp_path / "fused", alphabet="0123456789 ")
    grader = _grader(tok)
    assert GOPDTrainer._correct(grader, _decoded(tok, "1801"), "1801")
    assert GOPDTrainer._correct(grader, " 1801\n", "1801")
    assert not GOPDTrainer._correct(grader, _decoded(tok, "18 01"), "1801")
