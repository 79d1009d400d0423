"""Prompts in, text out: reading and encoding prompts into jobs, streaming or printing their text."""
from __future__ import annotations

import sys
import time

from ..errors import HaloError
from ..model.jobs import Job


def read_prompts(a) -> list[str]:
    """--prompt (repeatable) or --prompt-file (one prompt per line, blank lines skipped)."""
    if bool(a.prompt) == bool(a.prompt_file):
        raise HaloError("give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line)")
    if a.prompt:
        for prompt in a.prompt:       # bytes that are not UTF-8 reach Python as lone surrogates
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise HaloError(f"--prompt is not UTF-8 text (character {e.start}); set a UTF-8 "
                                f"locale in the terminal, or convert it, e.g. iconv -t UTF-8") from None
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


def stop_ids(tok, a) -> frozenset[int]:
    return frozenset() if a.ignore_eos else frozenset(tok.stop_ids)


class TokenPrinter:
    """Streams a sequence's text to stdout as tokens come (or prints it whole with --quiet)."""

    def __init__(self, tok, prefix: str, quiet: bool, label: str = ""):
        self.tok, self.quiet, self.stream = tok, quiet, tok.streamer()
        self.prefix, self.label, self.started = prefix, label, False

    def __call__(self, token: int):
        if not self.quiet:
            self._start()
            sys.stdout.write(self.stream.push(token))
            sys.stdout.flush()

    def _start(self):
        if not self.started:
            self.started = True
            sys.stdout.write(self.label + self.prefix)

    def close(self, tokens: list[int]):
        if self.quiet:
            print(self.tok.decode(tokens))
        else:
            self._start()
            sys.stdout.write(self.stream.flush() + "\n")
            sys.stdout.flush()


class Progress:
    """`--progress SECONDS`: a line on stderr every SECONDS while tokens come; `links()` gives
    rank -> on-time rate (tensor mode) or nothing."""

    def __init__(self, every_s: float, links=lambda: {}):
        self.every_s, self.links, self.clock = every_s, links, time.perf_counter
        self.start = self.last = self.clock()
        self.tokens = 0

    def __call__(self, token: int):
        self.tokens += 1
        now = self.clock()
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            rates = " ".join(f"{r}:{v:.2f}" for r, v in sorted(self.links().items()))
            print(f"progress: {self.tokens} tokens, {self.tokens / (now - self.start):.1f} tokens/s"
                  + (f", on-time rank:rate {rates}" if rates else ""), file=sys.stderr, flush=True)


class Output:
    """generate's prompts as jobs (rank 0), and their text: streamed token by token when one
    sequence runs at a time, each sequence whole (`[i] text`) as it finishes when several
    run at once (pipeline mode, or batches of several prompts in one process)."""

    def __init__(self, a, options):
        self.a, self.in_flight = a, options.pipeline.num_sequences
        self.concurrent = options.parallel == "pipeline"
        self.batched = options.parallel in ("none", "tensor") and options.max_batch > 1
        self.prompts: list[str] = []
        self.printers: dict[int, TokenPrinter] = {}
        self.progress = Progress(a.progress)
        self.tok = None

    def jobs(self, tok, context: int) -> list[Job]:
        """The prompts encoded into jobs (rank 0, while the mode opens)."""
        a, self.tok = self.a, tok
        self.prompts = read_prompts(a)
        self.concurrent = self.concurrent or (self.batched and len(self.prompts) > 1)
        jobs = []
        for index, prompt in enumerate(self.prompts):
            ids, max_new = encode_prompt(tok, prompt, a, context)
            jobs.append(Job(ids, max_new, a.temperature, a.top_p, a.seed, stop_ids(tok, a),
                            on_token=self._on_token(index), index=index))
        if self.concurrent and not self.batched and self.in_flight > len(jobs):
            print(f"note: --num-sequences {self.in_flight} capped to the {len(jobs)} prompts given",
                  file=sys.stderr)
        return jobs

    def _on_token(self, index: int):
        def on_token(token: int) -> bool:
            if not self.concurrent:
                self._printer(index)(token)
            self.progress(token)
            return False
        return on_token

    def _printer(self, index: int) -> TokenPrinter:
        if index not in self.printers:
            a = self.a
            label = f"[{index}] " if len(self.prompts) > 1 else ""
            prefix = "" if a.chat else self.prompts[index]
            self.printers[index] = TokenPrinter(self.tok, prefix, a.quiet, label)
        return self.printers[index]

    def finished(self, job: Job):
        if self.concurrent:
            prefix = "" if self.a.chat or self.a.quiet else self.prompts[job.index]
            print(f"[{job.index}] {prefix}{self.tok.decode(job.result.tokens)}", flush=True)
        else:
            self._printer(job.index).close(job.result.tokens)
