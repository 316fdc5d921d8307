"""``FidelityReport``: the numbers of ``tca_flex.report`` and their views (table, dict/JSON, heat map).

Everything is stored per evaluated query (``[layers, H_q, Q]``) and reduced
to per-(layer, KV head) summaries on demand; query head ``h`` belongs to KV
head ``h // g``, the grouping used by the kernels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPORT_VERSION = 1
_STATS = ("mean", "quantile", "max")


@dataclass(frozen=True)
class LayerFidelity:
    """One layer's measurements for one request (CPU tensors).

    Attributes:
        kept_fraction: float32 ``[H_kv]``, fraction of the prompt's keys in the
            head's kept set (global subset + final window); 1 for a dense layer.
        gamma: float32 ``[H_q, Q]``, dropped mass of each evaluated query.
        diff: float32 ``[H_q, Q]``, ``max_d |o_sparse - o_dense|`` computed in
            float32 on the same kept set: the quantity Theorem 1 bounds
            (NaN when not measured).
        kernel_diff: float32 ``[H_q, Q]``, the same for the layer's actual
            output (kernel, model dtype), so it also holds kernel rounding
            (NaN when not measured).
        max_abs_v: float32 ``[H_kv]``, ``max|V|`` of each KV head.
        sparse: whether the layer ran TCA (False: it ran exactly dense).
    """

    kept_fraction: torch.Tensor
    gamma: torch.Tensor
    diff: torch.Tensor
    kernel_diff: torch.Tensor
    max_abs_v: torch.Tensor
    sparse: bool


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile along the last dim (``torch.quantile`` caps the input size)."""
    s = x.sort(-1).values
    pos = q * (x.shape[-1] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[..., lo] + (s[..., hi] - s[..., lo]) * (pos - lo)


def _plain(values: Any) -> Any:
    """Nested lists with NaN as ``None`` (valid JSON)."""
    if isinstance(values, list):
        return [_plain(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


@dataclass(frozen=True)
class FidelityReport:
    """What TCA dropped for one request, per layer and KV head, and Theorem 1's bound.

    Attributes:
        positions: int64 ``[Q]``, the evaluated query positions.
        seq_len: ``L``, the prompt length.
        queries: how the queries were chosen (``"last"``, ``"all"`` or ``N``).
        quantile: the high quantile reported besides mean and max.
        sparse_layers: bool ``[layers]``, the layers that ran TCA.
        kept_fraction: float32 ``[layers, H_kv]``, see ``LayerFidelity``.
        max_abs_v: float32 ``[layers, H_kv]``.
        gamma, diff, kernel_diff: float32 ``[layers, H_q, Q]``, see
            ``LayerFidelity``.
    """

    positions: torch.Tensor
    seq_len: int
    queries: str
    quantile: float
    sparse_layers: torch.Tensor
    kept_fraction: torch.Tensor
    max_abs_v: torch.Tensor
    gamma: torch.Tensor
    diff: torch.Tensor
    kernel_diff: torch.Tensor

    @classmethod
    def from_layers(cls, layers: list[LayerFidelity], *, positions: torch.Tensor, seq_len: int,
                    queries: str, quantile: float) -> FidelityReport:
        """Stack per-layer results (in layer order)."""
        return cls(positions=positions.cpu(), seq_len=seq_len, queries=queries, quantile=quantile,
                   sparse_layers=torch.tensor([lf.sparse for lf in layers]),
                   kept_fraction=torch.stack([lf.kept_fraction for lf in layers]),
                   max_abs_v=torch.stack([lf.max_abs_v for lf in layers]),
                   gamma=torch.stack([lf.gamma for lf in layers]),
                   diff=torch.stack([lf.diff for lf in layers]),
                   kernel_diff=torch.stack([lf.kernel_diff for lf in layers]))

    @property
    def num_layers(self) -> int:
        return self.kept_fraction.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kept_fraction.shape[1]

    @property
    def group(self) -> int:
        """``g``, query heads per KV head."""
        return self.gamma.shape[1] // self.num_kv_heads

    def _by_kv(self, x: torch.Tensor) -> torch.Tensor:
        """``[layers, H_q, Q]`` -> ``[layers, H_kv, g * Q]`` (query heads of a KV head are adjacent)."""
        return x.reshape(self.num_layers, self.num_kv_heads, -1)

    def gamma_stat(self, stat: str = "max") -> torch.Tensor:
        """float32 ``[layers, H_kv]``: ``"mean"``, ``"quantile"`` or ``"max"`` of gamma.

        Taken over the evaluated queries and the KV head's ``g`` query heads.
        """
        g = self._by_kv(self.gamma)
        if stat == "mean":
            return g.mean(-1)
        if stat == "quantile":
            return _quantile(g, self.quantile)
        if stat == "max":
            return g.amax(-1)
        raise ValueError(f"stat={stat!r} is not one of {list(_STATS)}")

    @property
    def bound(self) -> torch.Tensor:
        """float32 ``[layers, H_kv]``: ``2 * max_i gamma_i * max|V|``, Theorem 1's bound on any change."""
        return 2 * self.gamma_stat("max") * self.max_abs_v

    @property
    def query_bound(self) -> torch.Tensor:
        """float32 ``[layers, H_q, Q]``: each query's own bound ``2 * gamma_i * max|V|``."""
        return 2 * self.gamma * self.max_abs_v.repeat_interleave(self.group, dim=1).unsqueeze(-1)

    @property
    def max_diff(self) -> torch.Tensor:
        """float32 ``[layers, H_kv]``: largest measured change (float32 math); NaN if not measured."""
        return self._by_kv(self.diff).amax(-1)

    @property
    def max_kernel_diff(self) -> torch.Tensor:
        """float32 ``[layers, H_kv]``: largest change of the actual kernel output; NaN if not measured."""
        return self._by_kv(self.kernel_diff).amax(-1)

    def worst(self) -> list[tuple[int, int]]:
        """``(layer, kv_head)`` pairs, largest gamma max first (ties: larger bound first)."""
        by_bound = torch.sort(self.bound.flatten(), descending=True, stable=True).indices
        gamma_max = self.gamma_stat("max").flatten()[by_bound]
        by_gamma = torch.sort(gamma_max, descending=True, stable=True).indices
        return [divmod(int(i), self.num_kv_heads) for i in by_bound[by_gamma]]

    def table(self, max_rows: int | None = 12) -> str:
        """Compact text table, worst heads first; ``max_rows=None`` lists every head."""
        mean, qnt, mx = (self.gamma_stat(s) for s in _STATS)
        bound, diff, kdiff = self.bound, self.max_diff, self.max_kernel_diff
        order = self.worst()
        p = f"p{100 * self.quantile:g}"
        lines = [
            f"TCA fidelity: {self.seq_len} tokens, queries={self.queries} "
            f"({self.positions.numel()} evaluated), "
            f"{int(self.sparse_layers.sum())}/{self.num_layers} layers sparse",
            "gamma = dropped attention mass; Theorem 1: |o - o_dense| <= bound = 2 * gamma max * max|V|",
            f"{'layer':>5} {'kv':>3} {'kept':>6} {'gamma mean':>10} {p + ' gamma':>10} {'gamma max':>10} "
            f"{'bound':>9} {'max diff':>9} {'kernel diff':>11}",
        ]
        shown = order if max_rows is None else order[:max_rows]
        for layer, h in shown:
            lines.append(f"{layer:>5} {h:>3} {100 * float(self.kept_fraction[layer, h]):>5.1f}% "
                         f"{float(mean[layer, h]):>10.3g} {float(qnt[layer, h]):>10.3g} "
                         f"{float(mx[layer, h]):>10.3g} {float(bound[layer, h]):>9.3g} "
                         f"{float(diff[layer, h]):>9.3g} {float(kdiff[layer, h]):>11.3g}")
        if len(shown) < len(order):
            lines.append(f"... {len(order) - len(shown)} more heads (report.table(max_rows=None) lists all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self, per_query: bool = False) -> dict[str, Any]:
        """Plain-Python summary: ``[layer][kv_head]`` lists, NaN as ``None``.

        ``per_query`` adds the raw ``[layer][query_head][query]`` arrays.
        """
        out: dict[str, Any] = {
            "version": REPORT_VERSION,
            "seq_len": self.seq_len,
            "queries": self.queries,
            "positions": self.positions.tolist(),
            "quantile": self.quantile,
            "sparse_layers": self.sparse_layers.tolist(),
            "kept_fraction": self.kept_fraction.tolist(),
            "gamma_mean": self.gamma_stat("mean").tolist(),
            "gamma_quantile": self.gamma_stat("quantile").tolist(),
            "gamma_max": self.gamma_stat("max").tolist(),
            "bound": self.bound.tolist(),
            "max_diff": self.max_diff.tolist(),
            "max_kernel_diff": self.max_kernel_diff.tolist(),
            "max_abs_v": self.max_abs_v.tolist(),
            "worst": [list(lh) for lh in self.worst()],
        }
        if per_query:
            out["per_query"] = {"gamma": self.gamma.tolist(), "diff": self.diff.tolist(),
                                "kernel_diff": self.kernel_diff.tolist()}
        return {k: _plain(v) for k, v in out.items()}

    def to_json(self, path: str | Path | None = None, per_query: bool = False) -> str:
        """JSON of ``to_dict``; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(per_query), allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, path: str | Path, stat: str = "max") -> Path:
        """PNG heat map of gamma (``stat`` over queries), layers x KV heads. Needs matplotlib."""
        try:
            from matplotlib.figure import Figure  # optional extra; pyplot avoided: no global state
            from matplotlib.ticker import MaxNLocator
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("FidelityReport.plot needs matplotlib: pip install matplotlib") from err
        data = self.gamma_stat(stat).numpy()
        fig = Figure(figsize=(2.5 + 0.6 * self.num_kv_heads, 1.5 + 0.22 * self.num_layers))
        ax = fig.add_subplot()
        image = ax.imshow(data, aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"TCA dropped mass gamma ({stat}), {self.seq_len} tokens")
        fig.colorbar(image, ax=ax, label="gamma")
        path = Path(path)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path
