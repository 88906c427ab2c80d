"""megaflow.inference.generate.sample_next: the sampled frequencies are the distribution's, top-k/top-p cut
tokens are never drawn, per-row generators do not depend on the batch, greedy is the argmax."""

import torch

from megaflow.inference.generate import SamplingParams, sample_next


def _logits(n: int) -> torch.Tensor:
    return torch.log(torch.tensor([[0.1, 0.6, 0.3, 1e-30, 0.0]]).clamp(min=1e-30)).repeat(n, 1)


def test_sampled_frequencies_follow_the_distribution():
    tokens, logps = sample_next(_logits(200_000), 4, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert torch.allclose(freq[:3], torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=5e-3)
    assert freq[3] == 0 and freq[4] == 0  # a zero-probability token and a padded vocabulary row
    assert torch.allclose(logps, torch.log_softmax(_logits(1), -1)[0][tokens], atol=1e-6)


def test_top_k_and_top_p_never_draw_what_they_cut():
    for params in (SamplingParams(top_k=2), SamplingParams(top_p=0.6)):
        tokens, _ = sample_next(_logits(20_000), 4, params, torch.Generator().manual_seed(1))
        assert set(tokens.tolist()) <= ({1, 2} if params.top_k else {1})


def test_row_generators_do_not_depend_on_the_rest_of_the_batch():
    """Row i's token comes from generator i only: a row sampled alone, or in a batch with other rows (idle
    rows included), gets the same token."""
    seeds = [11, 12, 13, 14]
    batch, _ = sample_next(_logits(4), 4, SamplingParams(), [torch.Generator().manual_seed(s) for s in seeds],
                           [True, False, True, True])
    for i in (0, 2, 3):
        alone, _ = sample_next(_logits(1), 4, SamplingParams(), [torch.Generator().manual_seed(seeds[i])], [True])
        assert batch[i] == alone[0]
    assert batch[1] == 1  # an idle row gets its argmax and draws nothing


def test_greedy_is_the_argmax_and_scaled_logprobs_use_the_temperature():
    tokens, logps = sample_next(_logits(3), 4, SamplingParams(greedy=True), None)
    assert tokens.tolist() == [1, 1, 1]
    _, scaled = sample_next(_logits(1), 4, SamplingParams(temperature=0.5, scaled_logprobs=True, top_k=1),
                            torch.Generator().manual_seed(0))
    assert torch.allclose(scaled, torch.log_softmax(_logits(1) / 0.5, -1)[0, 1:2], atol=1e-6)
