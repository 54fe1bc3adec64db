"""The three paths a call of `linear_cross_entropy` can take (planning.py picks one; `Plan.path`):

- recompute.py, "recompute": the memory-first mode, `ShardStats` (statistics forward, logits
  recomputed in the backward);
- held.py, "held": the fast mode where all tokens' logits fit one chunk, `LossWithHeldLogits`
  (the logits held to the backward, any upstream gradient);
- chunked.py, "chunked": the fast mode in token chunks, `LossWithGradInForward` (gradients formed
  in the forward, a uniform upstream gradient).

shared.py holds what they share (the saved plan, the global statistics, dE's sum over the group).
"""
