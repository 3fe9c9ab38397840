"""ampo.generation.top_p: the nucleus from each row's largest tokens gives vLLM's CPU masks bit for bit."""

import math

import pytest
import torch

from ampo.generation.top_p import top_p_mask

MINUS_INF = float("-inf")


def vllm_reference():
    """vLLM's own CPU top-p (the function ampo routes around), whether or not ampo's wrapper is installed."""
    ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    fn = ops.apply_top_k_top_p_pytorch
    return getattr(fn, "__wrapped__", fn)


class Counting:
    """A fallback that counts the rows it is given and masks them with `reference`."""

    def __init__(self, reference):
        self.reference, self.rows = reference, 0

    def __call__(self, rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        self.rows += len(rows)
        return self.reference(rows, None, p, True)


def test_hand_worked_row():
    # probabilities 0.5, 0.3, 0.15, 0.05 (logits = their logs); p = 0.75, so the threshold is 1 - p = 0.25.
    # Ascending cumulative sums: 0.05, 0.05+0.15 = 0.20, 0.20+0.3 = 0.50, 1.0. Masked where the sum is <= 0.25:
    # the 0.05 and 0.15 tokens; kept: 0.5 and 0.3 (together 0.8 >= 0.75).
    logits = torch.tensor([[math.log(0.15), math.log(0.5), math.log(0.05), math.log(0.3)]])
    expected = torch.tensor([[MINUS_INF, math.log(0.5), MINUS_INF, math.log(0.3)]])

    def no_fallback(rows, p):
        raise AssertionError("the three largest tokens decide this row")

    out = top_p_mask(logits.clone(), torch.tensor([0.75]), no_fallback, candidates=3)
    assert torch.equal(out, expected)


def test_tie_at_the_boundary_goes_to_the_sort():
    # probabilities 0.4, 0.2, 0.2, 0.2 and p = 0.5 (threshold 0.5): ascending sums 0.2, 0.4, 0.6, 1.0, so one of
    # the three tied 0.2 tokens is kept and two are masked; which one is the sort's choice, so the row is handed on.
    logits = torch.log(torch.tensor([[0.2, 0.4, 0.2, 0.2, 0.0]]))
    calls = []

    def fallback(rows, p):
        calls.append(rows.clone())
        return rows

    top_p_mask(logits.clone(), torch.tensor([0.5]), fallback, candidates=4)
    assert len(calls) == 1


def test_rows_without_finite_probabilities_and_other_dtypes_go_to_the_sort():
    logits = torch.randn(3, 600, generator=torch.Generator().manual_seed(3)) * 10  # peaked: nucleus within 64
    logits[1] = MINUS_INF  # every token removed: softmax gives NaN
    logits[2, 7] = float("nan")
    seen = []

    def fallback(rows, p):
        seen.append(len(rows))
        return rows

    top_p_mask(logits.clone(), torch.full((3,), 0.9), fallback, candidates=64)
    assert seen == [2]  # rows 1 and 2, together; row 0 is decided from its 64 largest tokens
    seen.clear()
    top_p_mask(logits[:1].clone().double(), torch.full((1,), 0.9, dtype=torch.float64), fallback, candidates=64)
    assert seen == [1]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(rows, vocab\).*\(3,\)"):
        top_p_mask(torch.zeros(2, 5), torch.zeros(3), lambda rows, p: rows)


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0, 8.0])
def test_equals_vllm_on_random_rows(scale):
    """Rows from flat to peaked, p from 0.3 to 1, a few -inf tokens and repeated logits: every row equals vLLM's
    (values and -inf positions), and most rows are decided without the sort."""
    reference = vllm_reference()
    gen = torch.Generator().manual_seed(int(scale * 10))
    rows, vocab = 64, 3000
    logits = torch.randn(rows, vocab, generator=gen) * scale
    logits[::7, :50] = MINUS_INF  # tokens another processor removed
    logits[1::5] = torch.round(logits[1::5] * 4) / 4  # many equal logits
    p = torch.tensor([0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0, 0.95])[torch.arange(rows) % 8]
    fallback = Counting(reference)
    ours = top_p_mask(logits.clone(), p, fallback, candidates=128)
    theirs = reference(logits.clone(), None, p, True)
    assert torch.equal(ours, theirs)
    if scale >= 4.0:  # peaked rows: the nucleus lies among the 128 largest tokens for most of them
        assert fallback.rows < rows // 2, fallback.rows
