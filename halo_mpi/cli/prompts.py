"""Prompts in, text out: reading and encoding prompts, checking lengths, streaming tokens."""
from __future__ import annotations

import sys

from ..errors import HaloError


def read_prompts(a) -> list[str]:
    """--prompt (repeatable) or --prompt-file (one prompt per line, blank lines skipped)."""
    if bool(a.prompt) == bool(a.prompt_file):
        raise HaloError("give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line)")
    if a.prompt:
        return list(a.prompt)
    try:
        with open(a.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    except OSError as e:
        raise HaloError(f"cannot read --prompt-file {a.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise HaloError(f"--prompt-file {a.prompt_file} is not UTF-8 text (byte {e.start}); "
                        f"convert it, e.g. iconv -t UTF-8") from None
    if not prompts:
        raise HaloError(f"--prompt-file {a.prompt_file} holds no prompt")
    return prompts


def check_lengths(n_prompt: int, max_new: int, context: int) -> int:
    """The number of tokens to generate; an error when the prompt alone fills the context."""
    if n_prompt == 0:
        raise HaloError("the prompt is empty")
    if n_prompt >= context:
        raise HaloError(f"the prompt has {n_prompt} tokens, the model's context is {context}; "
                        f"shorten the prompt")
    if n_prompt + max_new > context:
        print(f"note: --max-new-tokens {max_new} capped to {context - n_prompt} by the context "
              f"of {context} tokens", file=sys.stderr)
    return min(max_new, context - n_prompt)


def encode_prompt(tok, prompt: str, a, context: int) -> tuple[list[int], int]:
    """Token ids of one prompt (ChatML-wrapped with --chat) and how many tokens to generate."""
    ids = tok.encode(tok.chat(prompt, a.system) if a.chat else prompt)
    return ids, check_lengths(len(ids), a.max_new_tokens, context)


def stop_ids(tok, a) -> set[int]:
    return set() if a.ignore_eos else tok.stop_ids


class TokenPrinter:
    """Streams a sequence's text to stdout as tokens come (or prints it whole with --quiet)."""

    def __init__(self, tok, prefix: str, quiet: bool, label: str = ""):
        self.tok, self.quiet, self.stream = tok, quiet, tok.streamer()
        if not quiet:
            sys.stdout.write(label + prefix)
            sys.stdout.flush()

    def __call__(self, token: int):
        if not self.quiet:
            sys.stdout.write(self.stream.push(token))
            sys.stdout.flush()

    def close(self, tokens: list[int]):
        if self.quiet:
            print(self.tok.decode(tokens))
        else:
            sys.stdout.write(self.stream.flush() + "\n")
            sys.stdout.flush()
