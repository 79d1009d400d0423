"""Tokenizer built from the stored vocab and merges: llama.cpp's behaviour, round trips, ChatML."""
import pytest

from halo_mpi.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow      # the tokenizer of the real model

TEXTS = ["The capital of France is", "  leading spaces and\ttabs\n\nnewlines",
         "Numbers: 3.14159, 2024-11-23, 1000000", "Ünïcödé: naïve café, 日本語, emoji 🚀🎉",
         "def f(x):\n    return x ** 2  # comment", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def tok(real_store):
    return Tokenizer.from_store(real_store)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_known_ids(tok):
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("year 2024")
    assert [tok.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]


def test_no_bos_and_control_tokens_are_special(tok):
    assert tok.encode("hi")[0] != tok.bos_id
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.stop_ids >= {0, 2}


def test_chat_format(tok):
    text = tok.chat("What is 2+2?")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(text).count(1) == 3


def test_streaming_holds_back_partial_utf8(tok):
    text = "naïve 🚀 日本"
    stream = tok.streamer()
    pieces = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_synthetic_byte_tokenizer_round_trips(tiny_store):
    tok = Tokenizer.from_store(tiny_store)
    assert tok.decode(tok.encode("héllo 42")) == "héllo 42"


@pytest.mark.parametrize("text", TEXTS)
def test_the_unlocked_encode_is_the_same(tok, text):
    assert tok.encode_unlocked(text) == tok.encode(text)


def test_no_text_has_fewer_tokens_than_its_bytes_over_the_longest_token(tok):
    for text in TEXTS + ["word " * 1000, "a" * 5000]:
        assert len(tok.encode(text)) >= len(text.encode()) // tok.longest_token_bytes
