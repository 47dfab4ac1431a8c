"""The init report: time and, per layer, the initial model's weight error next to plain QLoRA's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One target layer.

    Attributes:
        name: module name inside the transformers model.
        shape: (out, in) of the weight.
        source: where W came from: "checkpoint" (original weights), "dequantized" (the 4-bit
            copy; lower fidelity) or "module" (an unquantized layer's own weight).
        seconds: wall time of this layer's init.
        rel_err: ‖W − (base + s·B·A)‖_F / ‖W‖_F of the initialized model.
        qlora_rel_err: ‖W − base₀‖_F / ‖W‖_F of the model before init (plain QLoRA; 0 unquantized).
    """

    name: str
    shape: tuple[int, int]
    source: str
    seconds: float
    rel_err: float
    qlora_rel_err: float


@dataclass
class InitReport:
    """What ``get_qolora_model`` did; ``str(report)`` is a table."""

    init: str
    init_source: str
    seconds: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)

    def sources(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.source] = counts.get(layer.source, 0) + 1
        return counts

    def mean_ratio(self) -> float:
        """Mean over layers of rel_err / qlora_rel_err (< 1: closer to the original than QLoRA)."""
        ratios = [x.rel_err / x.qlora_rel_err for x in self.layers if x.qlora_rel_err > 0]
        return sum(ratios) / len(ratios) if ratios else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "init_source": self.init_source,
            "seconds": self.seconds,
            "sources": self.sources(),
            "layers": [asdict(x) for x in self.layers],
        }

    def __str__(self) -> str:
        head = f"{'layer':<44} {'shape':>11} {'source':>12} {'sec':>7} {'rel_err':>9} {'qlora_err':>9}"
        lines = [
            f"QOLoRA init ({self.init}, source {self.init_source}): {len(self.layers)} layers "
            f"in {self.seconds:.2f} s, sources {self.sources()}",
            head,
            "-" * len(head),
        ]
        for x in self.layers:
            shape = f"{x.shape[0]}x{x.shape[1]}"
            lines.append(
                f"{x.name[-44:]:<44} {shape:>11} {x.source:>12} {x.seconds:>7.3f} "
                f"{x.rel_err:>9.5f} {x.qlora_rel_err:>9.5f}"
            )
        if self.layers:
            lines.append(f"mean rel_err / qlora_err: {self.mean_ratio():.4f}")
        return "\n".join(lines)
