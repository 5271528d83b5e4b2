"""The learning-rate schedule of pre-training and fine-tuning alike (paper Table 4: linear warm-up, linear decay)."""

from __future__ import annotations


def lr_multiplier(step_index: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR for the ``step_index``-th optimizer step (0-based): linear warm-up to 1 over
    ``warmup_steps`` steps, then linear decay reaching 0 at ``total_steps`` (Table 4)."""
    step = step_index + 1
    if step <= warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step_index) / max(1, total_steps - warmup_steps))
