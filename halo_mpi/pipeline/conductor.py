"""Rank 0's duties besides its block: sequences enter, the head samples, sequences leave.

    conductor = Conductor(ring, stage, clock)
    conductor.drive(JobList(jobs))        # or a server's queue: jobs join and leave as they come

Each round rank 0 takes every sequence whose final state has come home, applies the head to all
of them in one matmul (in parts of --max-batch), samples each with its own sampler, and runs its
block over their new tokens and the next chunk of one joining prompt in one ragged step
(pipeline/stage.py), sending each sequence on in its own message. A prompt enters chunk by chunk,
one chunk a round, so that a long prompt does not hold up the sequences that are decoding.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.generate import GenerationResult, Sampler, pick_token
from ..model.jobs import Finished, Job, JobList, JobSource
from ..net.framing import Kind, Message
from ..net.launch import responsive
from .ring import WAIT, Clock, Ring, check
from .stage import Feed, Stage, in_parts


@dataclass
class Sequence:
    job: Job
    sampler: Sampler
    result: GenerationResult
    started_at: float
    fed: int = 0                                              # prompt tokens through rank 0's block
    token_times: list[float] = field(default_factory=list)   # perf_counter of each token
    logits: list[torch.Tensor] = field(default_factory=list)  # (vocab,) per sample, keep_logits

    @property
    def index(self) -> int:
        return self.job.index

    @property
    def next_pos(self) -> int:
        """Position of the newest token, whose state comes home next."""
        return len(self.job.ids) + len(self.result.tokens) - 1

    @property
    def span(self) -> tuple[int, int]:
        """(prompt length, KV capacity) as the ring's messages carry them."""
        return len(self.job.ids), self.job.max_len


Rows = tuple[Sequence, int, list[int]]      # a sequence, the position of its first new token, the ids


class Conductor:
    """Rank 0's loop (see the module). keep_logits: each sequence keeps the logits of every
    sample (tests)."""

    def __init__(self, ring: Ring, stage: Stage, clock: Clock, on_finish: Finished | None = None,
                 keep_logits: bool = False):
        self.ring, self.stage, self.clock, self.plan = ring, stage, clock, stage.plan
        self.on_finish, self.keep_logits = on_finish, keep_logits
        self.active: dict[int, Sequence] = {}
        self.done: dict[int, Sequence] = {}
        self.prefilling: deque[Sequence] = deque()      # admitted, prompt not all sent yet

    def drive(self, source: JobSource, cancelled=None):
        """Up to the plan's in-flight count of jobs at once, until the source is exhausted and
        every job has finished; a finishing job frees its slot for the next."""
        while True:
            self.admit(source)
            if not self.active:
                if source.exhausted():
                    return
                responsive()        # idle, not stuck in MPI (net/launch.py DeathWatch)
                continue
            home = self.ring.poll(0.0 if self.prefilling else WAIT)
            rows = self.sample(home)
            if self.prefilling:
                rows.append(self.next_chunk())
            self.send_round(rows)
            check(cancelled)

    def admit(self, source: JobSource):
        """Waiting jobs join, up to the in-flight count (waiting up to WAIT when none runs)."""
        while len(self.active) < self.plan.in_flight:
            job = source.take(0.0 if self.active else WAIT)
            if job is None:
                return
            if job.cancelled():
                job.result = GenerationResult(len(job.ids), stopped_by="cancelled")
                self.on_finish and self.on_finish(job)
                continue
            seq = self.active[job.index] = Sequence(job, job.sampler(), GenerationResult(len(job.ids)),
                                                    time.perf_counter())
            self.prefilling.append(seq)

    def next_chunk(self) -> Rows:
        """The next --prefill-chunk tokens of the first joining prompt."""
        seq = self.prefilling[0]
        ids = seq.job.ids[seq.fed:seq.fed + self.plan.chunk]
        rows = (seq, seq.fed, ids)
        seq.fed += len(ids)
        if seq.fed == len(seq.job.ids):
            self.prefilling.popleft()
        return rows

    def send_round(self, rows: list[Rows]):
        """Rank 0's block over the rows, --max-batch sequences a step; each sequence sent on."""
        for part in in_parts(rows, self.stage.max_batch):
            with self.clock.compute(), torch.inference_mode():
                lengths = [len(ids) for _, _, ids in part]
                h = self.stage.model.embed(torch.tensor([t for _, _, ids in part for t in ids]))  # (N, dim)
                outs = self.stage.run([Feed(seq.index, step, x, seq.span)
                                       for (seq, step, _), x in zip(part, h.split(lengths))])
            for (seq, step, _), out in zip(part, outs):
                self.ring.pass_on(self.plan, seq.index, step, out, seq.span)     # out: (T, dim)

    def sample(self, home: list[Message]) -> list[Rows]:
        """The final hidden states that came home: the head over all of them, each sequence's
        next token sampled; those that go on give their token's row."""
        seqs = [self.returning(msg) for msg in home]
        rows = []
        for part in in_parts(list(zip(seqs, home)), self.stage.max_batch):
            with self.clock.compute(), torch.inference_mode():
                h = torch.cat([torch.from_numpy(msg.payload) for _, msg in part])   # (B, dim)
                logits = self.stage.model.head(h)                                  # (B, vocab)
            for (seq, _), row in zip(part, logits):
                token = self.pick(seq, row)
                if token is not None:
                    rows.append((seq, seq.next_pos, [token]))
        return rows

    def returning(self, msg: Message) -> Sequence:
        seq = self.active.get(msg.seq)
        if msg.kind != Kind.ACTIVATION or seq is None or msg.step != seq.next_pos:
            raise RuntimeError(f"rank 0: unexpected {msg.kind.name} from rank {msg.source} for "
                               f"sequence {msg.seq}, step {msg.step}")
        return seq

    def pick(self, seq: Sequence, logits: torch.Tensor) -> int | None:
        """seq's next token from its logits (vocab,), or None when it has finished."""
        self._record(seq, logits)
        job = seq.job
        if job.max_new == 0:
            return self.finish(seq, "max-new-tokens")
        with torch.inference_mode():
            verdict = pick_token(seq.sampler, logits, job.stop_ids, job.on_token, seq.result)
        if verdict is not None:
            return self.finish(seq, verdict)
        if len(seq.result.tokens) >= job.max_new:
            return self.finish(seq, "max-new-tokens")
        return seq.result.tokens[-1]

    def _record(self, seq: Sequence, logits: torch.Tensor):
        now = time.perf_counter()
        if seq.token_times:
            seq.result.decode_s.append(now - seq.token_times[-1])
        else:
            seq.result.prefill_s = now - seq.started_at      # time to the first token
        seq.token_times.append(now)
        if self.keep_logits:
            seq.logits.append(logits.clone())

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.result.stopped_by = reason
        self.stage.release(seq.index)
        self.ring.release(self.plan, seq.index)
        self.done[seq.index] = self.active.pop(seq.index)
        seq.job.result = seq.result
        if self.on_finish:
            self.on_finish(seq.job)


def conduct(ring: Ring, stage: Stage, clock: Clock, jobs: list[Job], on_finish: Finished | None = None,
            cancelled=None, keep_logits: bool = False) -> list[Sequence]:
    """Rank 0's loop over a fixed list of jobs (indexed 0..n-1): every sequence, in job order."""
    c = Conductor(ring, stage, clock, on_finish, keep_logits)
    c.drive(JobList(jobs), cancelled)
    return [c.done[job.index] for job in jobs]


class RingSession:
    """One sequence at a time through the ring, on rank 0: `prefill` and `decode` send its tokens
    round and wait for its state to come home (teacher-forced perplexity; model/generate.py's
    session calls)."""

    def __init__(self, ring: Ring, stage: Stage, clock: Clock, seq: int, max_len: int):
        self.ring, self.stage, self.clock, self.seq, self.capacity = ring, stage, clock, seq, max_len
        self.prompt_len = self.pos = 0

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.prompt_len = len(ids)
        tokens = torch.tensor(ids)
        for p in range(0, len(ids), self.stage.plan.chunk):
            self._send(p, tokens[p:p + self.stage.plan.chunk])
        return self._home()

    def decode(self, token: int) -> torch.Tensor:
        self._send(self.pos, torch.tensor([token]))
        return self._home()

    def _send(self, step: int, tokens: torch.Tensor):
        span = (self.prompt_len, self.capacity)
        with self.clock.compute():
            h = self.stage.run([Feed(self.seq, step, self.stage.model.embed(tokens), span)])[0]  # (T, dim)
        self.pos = step + tokens.shape[0]
        self.ring.pass_on(self.stage.plan, self.seq, step, h, span)

    def _home(self) -> torch.Tensor:
        """The logits (vocab,) of the newest token, once its state has come round."""
        while True:
            for msg in self.ring.poll(WAIT):
                if msg.kind != Kind.ACTIVATION or msg.seq != self.seq or msg.step != self.pos - 1:
                    raise RuntimeError(f"rank 0: unexpected {msg.kind.name} from rank {msg.source} "
                                       f"for sequence {msg.seq}, step {msg.step}")
                with self.clock.compute(), torch.inference_mode():
                    return self.stage.model.head(torch.from_numpy(msg.payload))[0]

    def close(self):
        self.stage.release(self.seq)
        self.ring.release(self.stage.plan, self.seq)
