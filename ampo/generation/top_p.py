"""Top-p (nucleus) masking without sorting the vocabulary, with the same result as vLLM's CPU sampler.

vLLM's CPU sampler (`apply_top_k_top_p_pytorch`) sorts every row of the logits over the whole vocabulary at every
decoding step to find the nucleus: with SmolLM2's 49,152 tokens and 96 sequences that sort is 0.13-0.25 s a step
on 2 cores, a quarter of the demo's generation time. The nucleus of a row lies among its few largest tokens, so
`top_p_mask` takes the largest `candidates` tokens of each row (`torch.topk`, about 20x cheaper than the sort),
decides the mask there, and hands a row to the sorting reference (`fallback`) whenever the candidates could decide
it differently:

- the nucleus reaches past the candidates (the smallest candidate is still kept);
- a candidate's cumulative probability lies within `TOLERANCE` of the threshold (vLLM sums the sorted
  probabilities in another order, so a token that close to the boundary could fall on the other side);
- the last kept and the first masked candidate have equal logits (the sort's order among ties decides which one
  vLLM keeps);
- the row has no finite probabilities (NaN logits, or every token already at -inf).

Only float32 logits take this path (the tolerance is float32's); others go to the reference whole.

vLLM's rule, restated: with the row's probabilities sorted ascending, a token is masked when the cumulative sum up
to and including it is at most 1 - p (computed in float32); the largest token is always kept. Kept tokens keep
their logits, masked ones become -inf. For every row `top_p_mask` returns what the reference returns, bit for bit
(tests/test_top_p.py checks this against vLLM's function).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CANDIDATES = 256  # tokens examined per row before falling back to the full sort
TOLERANCE = 1e-5  # |cumulative probability - (1 - p)| below which a row is decided by the full sort


def top_p_mask(
    logits: torch.Tensor,
    p: torch.Tensor,
    fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    candidates: int = CANDIDATES,
) -> torch.Tensor:
    """Mask `logits` (rows x vocab) in place to each row's top-p nucleus (p: one value per row) and return it.

    `fallback(rows_logits, rows_p)` is the sorting reference, called once with the rows the candidates cannot
    decide; it must return those rows masked."""
    if logits.dim() != 2 or p.shape != logits.shape[:1]:
        raise ValueError(f"top_p_mask: logits must be (rows, vocab) and p (rows,); got {tuple(logits.shape)} and "
                         f"{tuple(p.shape)}")  # fmt: skip
    rows, vocab = logits.shape
    m = min(candidates, vocab)
    if rows == 0 or m == vocab or logits.dtype != torch.float32:
        return fallback(logits, p)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    top_probs, top_idx = probs.topk(m, dim=-1)  # descending
    total = probs.sum(dim=-1, dtype=torch.float64, keepdim=True)
    top_double = top_probs.double()
    above = top_double.cumsum(dim=-1) - top_double  # mass of the larger tokens
    ascending_cum = total - above  # the sorted-ascending cumulative sum at each candidate, in float64
    threshold = (1 - p).unsqueeze(1).double()  # vLLM compares with 1 - p in float32
    keep = ascending_cum > threshold
    keep[:, 0] = True  # the largest token is always kept
    n_keep = keep.sum(dim=-1)
    undecided = keep[:, -1].clone()  # the nucleus may reach past the candidates
    undecided |= ~torch.isfinite(total.squeeze(1))  # NaN logits, or every token already removed: vLLM's own answer
    undecided |= ((ascending_cum - threshold).abs() <= TOLERANCE).any(dim=-1)
    top_logits = logits.gather(1, top_idx)
    last_kept = top_logits.gather(1, (n_keep - 1).clamp(max=m - 1).unsqueeze(1)).squeeze(1)
    first_masked = top_logits.gather(1, n_keep.clamp(max=m - 1).unsqueeze(1)).squeeze(1)
    undecided |= (n_keep < m) & (last_kept == first_masked)
    decided = (~undecided).nonzero().squeeze(1)
    if len(decided):
        minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype)
        kept_values = torch.where(keep[decided], top_logits[decided], minus_inf)
        masked = torch.full((len(decided), vocab), float("-inf"), dtype=logits.dtype)
        masked.scatter_(1, top_idx[decided], kept_values)
        logits[decided] = masked
    if undecided.any():
        rest = undecided.nonzero().squeeze(1)
        logits[rest] = fallback(logits[rest], p[rest])
    return logits
