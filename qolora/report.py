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

    def mean_ratio(self, kind: str | None = None) -> float:
        """Mean over layers (of ``kind``, see ``kind_of``) of rel_err / qlora_rel_err (< 1: closer
        to the original than QLoRA)."""
        ratios = [
            x.rel_err / x.qlora_rel_err
            for x in self.layers
            if x.qlora_rel_err > 0 and (kind is None or kind_of(x.name) == kind)
        ]
        return sum(ratios) / len(ratios) if ratios else math.nan

    def ratio_by_kind(self) -> dict[str, float]:
        """``mean_ratio`` per kind of layer, when there is more than one kind (a MoE model)."""
        kinds = sorted({kind_of(x.name) for x in self.layers})
        return {k: self.mean_ratio(k) for k in kinds} if len(kinds) > 1 else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "init_source": self.init_source,
            "seconds": self.seconds,
            "sources": self.sources(),
            **({"ratio_by_kind": self.ratio_by_kind()} if self.ratio_by_kind() else {}),
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
            kinds = ", ".join(f"{k} {v:.4f}" for k, v in self.ratio_by_kind().items())
            lines.append(f"mean rel_err / qlora_err: {self.mean_ratio():.4f}" + (f" ({kinds})" if kinds else ""))
        return "\n".join(lines)


def kind_of(layer: str) -> str:
    """The kind of a layer, for the report: "experts" (a MoE expert matrix) or "other"."""
    return "experts" if ".experts." in layer else "other"
