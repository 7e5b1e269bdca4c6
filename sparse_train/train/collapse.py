"""Router collapse: a warning when an MoE layer's routing keeps concentrating on few experts.

Read from the logged records (the load per expert is already on the host there), so it costs
no device read. A layer is collapsed at a logged step when one expert takes more than
`router.collapse_share` of its assignments, or the entropy of its load falls below
`router.collapse_entropy` x log(num_experts); after `router.collapse_steps` such logged steps in
a row it warns once, in one line naming the layer, the step and the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sparse_train.config import RouterConfig

LOAD_SUFFIX = "/expert_load"  # models.sparse.LOAD_NAMES["moe"]


class CollapseWatch:
    def __init__(self, cfg: RouterConfig, warn: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.warn = warn
        self.streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def check(self, step: int, record: dict[str, Any]) -> None:
        for key, load in record.items():
            if not (key.startswith("moe/") and key.endswith(LOAD_SUFFIX)) or len(load) < 2:
                continue
            layer = key[len("moe/") : -len(LOAD_SUFFIX)]
            total = sum(load) or 1.0
            shares = [v / total for v in load]
            top = max(shares)
            entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares))
            collapsed = top > self.cfg.collapse_share or entropy < self.cfg.collapse_entropy
            self.streak[layer] = self.streak.get(layer, 0) + 1 if collapsed else 0
            if self.streak[layer] >= self.cfg.collapse_steps and layer not in self.warned:
                self.warned.add(layer)
                self.warn(
                    f"warning: router collapse in {layer} at step {step}: the busiest expert takes {top:.0%} of "
                    f"assignments and the load's entropy is {entropy:.2f} of the maximum, for "
                    f"{self.streak[layer]} logged steps in a row (router.collapse_share={self.cfg.collapse_share}, "
                    f"router.collapse_entropy={self.cfg.collapse_entropy})"
                )
