"""Pipeline schedules: the order in which a stage runs forward and backward passes.

Each entry is ``(phase, microbatch, chunk)`` with phase "F" or "B" and ``chunk`` the stage's local
model chunk (global chunk = chunk x pp + stage, as Megatron-LM interleaves). GPipe runs every
forward, then every backward (Huang et al. 2019); 1F1B warms up with pp - stage - 1 forwards, then
alternates one forward and one backward (Narayanan et al. 2021 §2.2.1, PipeDream-Flush);
interleaved 1F1B follows Megatron-LM's ``forward_backward_pipelining_with_interleaving``:
(pp - stage - 1) x 2 + (v - 1) x pp warm-up passes over virtual microbatches. (Older Megatron-LM
releases ran every forward first when microbatches == pp; current megatron-core does not, and
neither does this.)
"""
from __future__ import annotations

Entry = tuple[str, int, int]


def _interleaved_ids(k: int, pp: int, v: int, forward: bool) -> tuple[int, int]:
    """(microbatch, local chunk) of virtual microbatch ``k`` (Megatron-LM's get_model_chunk_id)."""
    group = k % (pp * v)
    chunk = group // pp
    if not forward:
        chunk = v - 1 - chunk
    microbatch = (k // (pp * v)) * pp + k % pp
    return microbatch, chunk


def stage_schedule(schedule: str, pp: int, stage: int, microbatches: int, virtual_stages: int = 1) -> list[Entry]:
    """Execution order of forward and backward passes on ``stage``."""
    m, v = microbatches, virtual_stages
    if schedule == "gpipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(pp - stage - 1, m)
        order = [("F", i, 0) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", warmup + i, 0), ("B", i, 0)]
        return order + [("B", i, 0) for i in range(m - warmup, m)]
    if schedule == "interleaved":
        total = m * v
        warmup = min((pp - stage - 1) * 2 + (v - 1) * pp, total)
        fwd = lambda k: ("F", *_interleaved_ids(k, pp, v, True))    # noqa: E731
        bwd = lambda k: ("B", *_interleaved_ids(k, pp, v, False))   # noqa: E731
        order = [fwd(k) for k in range(warmup)]
        for i in range(total - warmup):
            order += [fwd(warmup + i), bwd(i)]
        return order + [bwd(k) for k in range(total - warmup, total)]
    raise ValueError(f"unknown schedule {schedule!r}")
