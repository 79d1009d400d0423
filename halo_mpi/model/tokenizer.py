"""Byte-level BPE tokenizer built from the vocabulary and merges stored in the HDF5 file.

It follows llama.cpp's behaviour for this model family: digits are split one by one before the
byte-level pre-tokenizer (no prefix space), control tokens are special, no BOS is added.
"""
from __future__ import annotations

import codecs
import re
from functools import lru_cache

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

CONTROL = 3  # GGUF token_type of control tokens (<|im_start|>, <|endoftext|>, ...)
DEFAULT_SYSTEM = "You are a helpful AI assistant."


@lru_cache(maxsize=1)
def _byte_table() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_symbols() -> list[str]:
    return list(_byte_table())


class Tokenizer:
    def __init__(self, tokens: list[str], token_type: list[int], merges: list[str],
                 bos_id: int, eos_id: int, chat_template: str = ""):
        self.tokens, self.bos_id, self.eos_id = tokens, bos_id, eos_id
        self.special_ids = {i for i, t in enumerate(token_type) if t == CONTROL}
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i in sorted(self.special_ids)])
        self._hf = hf
        self._byte_of = {c: b for b, c in enumerate(_byte_table())}
        self.stop_ids = {eos_id} | {vocab[t] for t in ("<|endoftext|>", "<|im_end|>") if t in vocab}
        self.system_prompt = _default_system(chat_template)
        self._longest: int | None = None

    @classmethod
    def from_store(cls, store) -> Tokenizer:
        return cls(**store.tokenizer_data())

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_unlocked(self, text: str) -> list[int]:
        """encode(text), letting other threads run meanwhile: the batch call releases the GIL
        while the Rust tokenizer works, the plain one was measured holding it for 2.5 s on a
        3.9 MB text (a server's event loop stalls with it)."""
        return self._hf.encode_batch([text], add_special_tokens=False)[0].ids

    @property
    def longest_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n bytes has at least n / this tokens."""
        if self._longest is None:
            self._longest = max(len(self.token_bytes(i)) for i in range(self.vocab_size))
        return self._longest

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a special token stands for its own text)."""
        text = self.tokens[token_id]
        if token_id in self.special_ids or any(c not in self._byte_of for c in text):
            return text.encode("utf-8")
        return bytes(self._byte_of[c] for c in text)

    def chat(self, user: str, system: str | None = None) -> str:
        """ChatML, as the model's chat template renders one user turn with a generation prompt."""
        system = self.system_prompt if system is None else system
        return (f"<|im_start|>system\n{system}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")

    def chat_messages(self, messages: list[dict]) -> str:
        """ChatML of a conversation ([{"role", "content"}, ...]) with a generation prompt; the
        model's own system message first unless the conversation brings one."""
        if not messages or messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    def streamer(self) -> TextStreamer:
        return TextStreamer(self)


def _default_system(chat_template: str) -> str:
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template or "", re.S)
    return m.group(1) if m else DEFAULT_SYSTEM


class TextStreamer:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self.tok.stop_ids:
            return ""
        return self._utf8.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
