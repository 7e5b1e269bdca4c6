"""Steps skipped for a non-finite loss or gradient, counted on the device.

A step is skipped on the device (fused AdamW's `found_inf`), so whether it was skipped is a
device flag; counting here keeps it there. The trainer reads the counts when it reports a step
(logging steps, checkpoints, the end): one host read for all three numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SkipCounts:
    total: int  # skipped steps in the whole run (resumes included)
    since_last_read: int
    streak: int  # skipped steps in a row, ending with the latest step (0: it was applied)
    longest_streak: int  # the longest run of skipped steps since the last read (ones still going included)


class SkippedSteps:
    def __init__(self, device: torch.device, total: int = 0) -> None:
        # built on the CPU and moved: one copy, and no device-side constructor from host data
        self._total = torch.tensor(total, dtype=torch.int64).to(device)
        self._streak = torch.zeros((), dtype=torch.int64, device=device)
        self._longest = torch.zeros((), dtype=torch.int64, device=device)
        self._total_at_last_read = total

    def record(self, skipped: torch.Tensor) -> None:
        """Count one step; `skipped` is its bool device flag (no host read)."""
        one = skipped.to(torch.int64)
        self._total += one
        self._streak = (self._streak + 1) * one
        self._longest = torch.maximum(self._longest, self._streak)

    def read(self) -> SkipCounts:
        """The counts on the host (one device read); the longest streak restarts from the current one."""
        total, streak, longest = torch.stack([self._total, self._streak, self._longest]).tolist()
        since, self._total_at_last_read = total - self._total_at_last_read, total
        self._longest = self._streak.clone()
        return SkipCounts(total=total, since_last_read=since, streak=streak, longest_streak=longest)
