"""The sampler on rank 0: every value the server lets through gives a token, the OpenAI options
(penalties, logit_bias, logprobs) do what they say, and a fault in one sequence's sampling ends
that sequence alone."""
import math

import pytest
import torch

from halo_mpi.model.generate import GenerationResult, LocalSession, Sampler, generate

VOCAB = 50


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.0), (2.0, 1e-12), (1e-300, 1.0), (1e-300, 0.0),
                                               (0.0, 0.0), (2.0, 1.0)])
def test_every_value_in_range_gives_a_token(temperature, top_p):
    for seed in (0, -(2 ** 63), 2 ** 64 - 1):
        token = Sampler(temperature, top_p, seed)(logits())
        assert 0 <= token < VOCAB


def test_top_p_zero_and_a_tiny_temperature_are_greedy():
    x = logits(1)
    best = int(torch.argmax(x))
    assert {Sampler(1.0, 0.0, s)(x) for s in range(20)} == {best}
    assert {Sampler(1e-300, 1.0, s)(x) for s in range(20)} == {best}


def test_logit_bias_forces_and_forbids_tokens():
    x = logits(2)
    assert Sampler(0.0, logit_bias={7: 100.0})(x) == 7
    best = int(torch.argmax(x))
    assert Sampler(0.0, logit_bias={best: -100.0})(x) != best


def test_penalties_turn_away_from_tokens_already_picked():
    x = torch.zeros(VOCAB)
    x[3], x[4] = 1.0, 0.5
    plain, penalised = Sampler(0.0), Sampler(0.0, presence_penalty=1.0)
    assert [plain(x) for _ in range(2)] == [3, 3]
    assert [penalised(x) for _ in range(2)] == [3, 4]      # 1.0 - 1.0 < 0.5
    frequent = Sampler(0.0, frequency_penalty=0.3)
    assert [frequent(x) for _ in range(3)] == [3, 3, 4]    # 1.0, 0.7, then 0.4 < 0.5


def test_logprobs_are_the_models_and_the_top_ones_in_order():
    x = logits(3)
    sampler = Sampler(1.0, seed=5, top_logprobs=3)
    token = sampler(x)
    (picked, logprob, top), = sampler.picks
    reference = torch.log_softmax(x, dim=-1)
    assert picked == token and math.isclose(logprob, float(reference[token]), abs_tol=1e-5)
    assert [i for i, _ in top] == torch.topk(reference, 3).indices.tolist()
    not_asked = Sampler(1.0)
    not_asked(x)
    assert not_asked.picks == []


class Failing(Sampler):
    """Fails at its third token."""
    calls = 0

    def __call__(self, logits):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("invalid multinomial distribution")
        return super().__call__(logits)


def test_a_fault_in_sampling_ends_that_sequence_with_its_error(tiny_store):
    from halo_mpi.model.llama import Transformer
    model = Transformer.from_store(tiny_store)
    result = generate(LocalSession(model, 16), [1, 2, 3], 8, Failing(0.0))
    assert result.stopped_by == "error" and "invalid multinomial" in result.error
    assert len(result.tokens) == 2
    after = generate(LocalSession(model, 16), [1, 2, 3], 4, Sampler(0.0))   # the model goes on
    assert isinstance(after, GenerationResult) and len(after.tokens) == 4 and after.error is None
