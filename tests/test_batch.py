"""Batched decode in one process: the model's ragged step against each sequence run alone, and
the Batcher (model/batch.py): joining, leaving, chunked prefill, --max-batch, cancellation.

Tolerance: float32 logits of a sequence in a batch equal its logits run alone up to summation
order (a (N, dim) matmul blocks its sums differently from a matrix-vector product, a prompt fed
in chunks attends in pieces): measured on SmolLM2, at most 7e-5 for decode rows and 4e-4 with a
chunked prefill, on logits up to ~34 (1.2e-5 relative, some 100 float32 epsilons over 30
layers); so atol 1e-3 (the bound tensor mode's exactness tests use), rtol 1e-5."""
import pytest
import torch

from halo_mpi.model.batch import Batcher, LocalBatch
from halo_mpi.model.generate import GenerationResult, LocalSession, Sampler, generate
from halo_mpi.model.jobs import Job, JobList
from halo_mpi.model.llama import Transformer

TOL = {"atol": 1e-3, "rtol": 1e-5}
PROMPTS = [[5, 70, 33, 9, 120, 17], [7, 8, 1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]]


@pytest.fixture(scope="module")
def tiny_model(tiny_store):
    return Transformer.from_store(tiny_store)


def alone(model: Transformer, ids: list[int], then: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt, then after each token of `then`, the sequence alone."""
    cache = model.new_cache(len(ids) + len(then))
    out = [model(torch.tensor(ids), cache, last_only=True)[0]]
    out += [model(torch.tensor([t]), cache, last_only=True)[0] for t in then]
    return out


def check_ragged_against_alone(model: Transformer):
    """Sequence 0 and 1 start together; 2 joins at step 2 with its prompt in chunks of 5 while
    the others decode; 1 leaves after step 2."""
    then = [[3, 4, 5, 6, 7], [9, 10], [11, 12]]
    want = [alone(model, p, t) for p, t in zip(PROMPTS, then)]
    caches = [model.new_cache(32) for _ in PROMPTS]
    got = [[], [], []]
    steps = [[(0, PROMPTS[0]), (1, PROMPTS[1])],
             [(0, [3]), (1, [9])],
             [(0, [4]), (1, [10]), (2, PROMPTS[2][:5])],       # 2 joins: its first chunk
             [(0, [5]), (2, PROMPTS[2][5:10])],                # 1 has left
             [(2, PROMPTS[2][10:]), (0, [6])],                 # any order of sequences
             [(0, [7]), (2, [11])],
             [(2, [12])]]
    for step in steps:
        logits = model.step([(caches[i], ids) for i, ids in step])
        for (i, _), row in zip(step, logits):
            if caches[i].pos >= len(PROMPTS[i]):         # not a prompt chunk before the last
                got[i].append(row)
    for i in range(3):
        assert len(got[i]) == len(want[i])
        for g, w in zip(got[i], want[i]):
            torch.testing.assert_close(g, w, **TOL)


def test_a_ragged_step_equals_each_sequence_alone_tiny(tiny_model, tiny_store):
    check_ragged_against_alone(tiny_model)
    packed = Transformer.from_store(tiny_store)
    packed.pack_for_batches()                     # several rows through oneDNN, one through MKL
    check_ragged_against_alone(packed)


@pytest.mark.slow
def test_a_ragged_step_equals_each_sequence_alone_smollm2(real_model, real_store):
    check_ragged_against_alone(real_model)
    packed = Transformer.from_store(real_store)
    packed.pack_for_batches()
    check_ragged_against_alone(packed)


def reference_run(model, job: Job) -> GenerationResult:
    return generate(LocalSession(model, job.max_len), job.ids, job.max_new, job.sampler(), job.stop_ids)


def jobs_of(prompts, max_new=8, **kw) -> list[Job]:
    return [Job(p, max_new, index=i, **kw) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("max_batch", [1, 2, 8])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_jobs_give_what_each_gives_alone(tiny_model, max_batch, temperature):
    jobs = jobs_of(PROMPTS * 2, temperature=temperature, seed=3)
    batcher = Batcher(LocalBatch(tiny_model), max_batch, prefill_chunk=64)
    with torch.inference_mode():
        done = batcher.run(JobList(jobs))
        want = [reference_run(tiny_model, job).tokens for job in jobs]
    assert sorted(job.index for job in done) == list(range(len(jobs)))
    assert [job.result.tokens for job in jobs] == want
    assert max(batcher.steps.batch) == min(max_batch, len(jobs))         # --max-batch respected
    for job in jobs:
        assert len(job.result.decode_s) == len(job.result.tokens) - 1 and job.result.prefill_s > 0


class Trickle:
    """A job source that hands out one more job every `every` takes (jobs arrive while others
    run), counted in takes, not in time."""

    def __init__(self, jobs: list[Job], every: int):
        self.jobs, self.every, self.takes = list(jobs), every, 0

    def take(self, timeout):
        self.takes += 1
        return self.jobs.pop(0) if self.jobs and self.takes % self.every == 0 else None

    def exhausted(self):
        return not self.jobs


def test_jobs_join_the_running_batch_and_leave_when_done(tiny_model):
    jobs = [Job(PROMPTS[0], 20, index=0), Job(PROMPTS[1], 3, index=1), Job(PROMPTS[2], 6, index=2)]
    order = []
    batcher = Batcher(LocalBatch(tiny_model), 4, prefill_chunk=64, on_finish=lambda j: order.append(j.index))
    with torch.inference_mode():
        batcher.run(Trickle(jobs, every=3))
        want = [reference_run(tiny_model, job).tokens for job in jobs]
    assert [job.result.tokens for job in jobs] == want
    assert order == [1, 2, 0]                    # the short ones left while 0 kept decoding
    assert max(batcher.steps.batch) >= 2 and list(batcher.steps.batch)[-1] == 1


def test_a_long_prompt_is_prefilled_in_chunks_beside_decoding_sequences(tiny_model):
    long_prompt = list(range(30, 80))
    jobs = [Job(PROMPTS[0], 16, index=0), Job(long_prompt, 4, index=1)]
    batcher = Batcher(LocalBatch(tiny_model), 4, prefill_chunk=8)
    with torch.inference_mode():
        batcher.run(Trickle(jobs, every=2))
        want = [reference_run(tiny_model, job).tokens for job in jobs]
    assert [job.result.tokens for job in jobs] == want
    steps = batcher.steps
    steps.batch, steps.decoding = list(steps.batch), list(steps.decoding)
    joined = steps.batch.index(2)
    # 50 prompt tokens in chunks of 8: 7 steps, each also decoding sequence 0
    assert steps.batch[joined:joined + 7] == [2] * 7 and steps.decoding[joined:joined + 7] == [1] * 7
    assert steps.decoding[joined + 6] == 1 and steps.decoding[joined + 7] == 2


def test_a_cancelled_job_leaves_and_the_others_go_on(tiny_model):
    seen = []
    gone = Job(PROMPTS[1], 20, index=1, on_token=lambda t: seen.append(t) or False,
               cancelled=lambda: len(seen) >= 3)
    jobs = [Job(PROMPTS[0], 10, index=0), gone, Job(PROMPTS[2], 10, index=2)]
    with torch.inference_mode():
        Batcher(LocalBatch(tiny_model), 8, prefill_chunk=64).run(JobList(jobs))
        want = [reference_run(tiny_model, job).tokens for job in jobs]
    assert gone.result.stopped_by == "cancelled" and gone.result.tokens == want[1][:3]
    assert jobs[0].result.tokens == want[0] and jobs[2].result.tokens == want[2]


def test_stop_tokens_and_on_token_stops_end_one_sequence(tiny_model):
    with torch.inference_mode():
        free = reference_run(tiny_model, Job(PROMPTS[0], 8)).tokens
    jobs = [Job(PROMPTS[0], 8, stop_ids=frozenset({free[2]}), index=0),
            Job(PROMPTS[0], 8, on_token=lambda t: True, index=1), Job(PROMPTS[0], 8, index=2)]
    with torch.inference_mode():
        Batcher(LocalBatch(tiny_model), 8, prefill_chunk=64).run(JobList(jobs))
    first = free.index(free[2])
    assert jobs[0].result.stopped_by == "end-of-sequence token" and jobs[0].result.tokens == free[:first]
    assert jobs[1].result.stopped_by == "stop" and len(jobs[1].result.tokens) == 1
    assert jobs[2].result.tokens == free and jobs[2].result.stopped_by == "max-new-tokens"


def test_sampler_state_is_per_sequence(tiny_model):
    """Penalties count each sequence's own picks: two copies of a job give the same tokens."""
    jobs = [Job(PROMPTS[0], 8, index=i, sampling={"frequency_penalty": 1.5}) for i in range(2)]
    with torch.inference_mode():
        Batcher(LocalBatch(tiny_model), 8, prefill_chunk=64).run(JobList(jobs))
        want = generate(LocalSession(tiny_model, 14), PROMPTS[0], 8, Sampler(frequency_penalty=1.5)).tokens
    assert jobs[0].result.tokens == jobs[1].result.tokens == want


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_a_packed_linear_gives_every_row_count_what_the_plain_one_does(rows):
    """Fewer rows than the packed layout's are padded with zero rows (faster on oneDNN); the
    result keeps only the rows given."""
    from halo_mpi.model.linear import Linear
    torch.manual_seed(rows)
    w, x = torch.randn(96, 40), torch.randn(rows, 40)
    packed = Linear(w)
    packed.pack_rows()
    y = packed(x)
    assert y.shape == (rows, 96) and float((y - x @ w.T).abs().max()) < 1e-4


def test_weights_are_packed_only_once_two_sequences_share_a_step(tiny_store):
    """A run of one sequence never pays the reordered copy's memory; the first step of two does."""
    model = Transformer.from_store(tiny_store)
    batch = LocalBatch(model)
    a, b = batch.open(16), batch.open(16)
    with torch.inference_mode():
        batch.step([(a, PROMPTS[0])])
        batch.step([(a, [3])])
        assert model.packed_bytes() == 0
        batch.step([(a, [4]), (b, PROMPTS[1])])
    assert model.packed_bytes() > 0
