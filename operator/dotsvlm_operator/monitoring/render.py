"""Pictures of the Grafana dashboards for the docs, drawn with matplotlib from live Prometheus results.

No Grafana server or image renderer installs on the build machine (none in Debian's main archive; a
Grafana build needs its Node frontend and a Chromium of its own), so this draws each dashboard itself:
the same panels, layout (`gridPos`), titles, queries, legend formats and units, every query evaluated
over a time range on a real Prometheus; time series as lines, stat panels as their last value. It is a
picture of what the dashboard's queries return, not a Grafana screenshot.

Dev only (matplotlib). `tests/serving/test_serving_observability.py` draws every dashboard from its
Prometheus; `make dashboard-pictures` runs that test so that it writes `docs/images/dashboards/*.png`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

# expr -> a Prometheus range query's matrix: [{"metric": {label: value}, "values": [[unix_ts, "value"], ...]}]
QueryRange = Callable[[str], list[dict[str, Any]]]

GRID_COLUMNS = 24  # Grafana's grid width
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel of a dashboard, the panels inside rows included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def legend(fmt: str | None, metric: dict[str, str]) -> str:
    """Grafana's legend format: `{{label}}` replaced by the series' label value."""
    if fmt:
        return _LEGEND_LABEL.sub(lambda m: metric.get(m.group(1), ""), fmt)
    shown = {k: v for k, v in metric.items() if k != "__name__"}
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + "}" if shown else "value"


def format_value(value: float, unit: str | None) -> str:
    """A value in a panel's unit, as Grafana shows it (the units our dashboards use)."""
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "bytes":
        for factor, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= factor:
                return f"{value / factor:.1f} {name}"
        return f"{value:.0f} B"
    suffix = " req/s" if unit == "reqps" else ""
    return f"{value:.3g}{suffix}"


def render_dashboard(dashboard: dict, query_range: QueryRange, out: Path, *, note: str = "") -> list[str]:
    """Draw `dashboard` with every query's result from `query_range` into the PNG `out`. Returns the
    titles of the panels whose queries returned no data (drawn as 'No data', as Grafana does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    items = list(panels(dashboard))
    rows = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in items), default=1)
    header = 1.2  # inches for the title
    row_inches = 0.42
    width = 18.0
    height = header + rows * row_inches
    empty: list[str] = []
    with plt.style.context("dark_background"):
        fig = plt.figure(figsize=(width, height), dpi=80)
        fig.patch.set_facecolor("#111217")
        fig.text(0.01, 1 - 0.45 / height, dashboard.get("title", ""), fontsize=16, weight="bold", va="center")
        fig.text(0.01, 1 - 0.85 / height, "Drawn by dotsvlm's own script (operator/dotsvlm_operator/monitoring/"
                 f"render.py) from live Prometheus query results, not by Grafana. {note}", fontsize=9,
                 color="#9fa7b3", va="center")
        top = 1 - header / height
        for panel in items:
            grid = panel["gridPos"]
            pad_x, pad_y = 0.012, 0.55 / height
            left = grid["x"] / GRID_COLUMNS + pad_x / 2
            w = grid["w"] / GRID_COLUMNS - pad_x
            h = grid["h"] * row_inches / height - pad_y
            bottom = top - (grid["y"] + grid["h"]) * row_inches / height + 0.25 / height
            ax = fig.add_axes((left + 0.035 * w, bottom, w * 0.95, h))
            ax.set_facecolor("#181b1f")
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_title(panel.get("title", ""), fontsize=10, loc="left", color="#d8d9da")
            unit = (panel.get("fieldConfig") or {}).get("defaults", {}).get("unit")
            series = [(legend(t.get("legendFormat"), r["metric"]), r["values"])
                      for t in panel.get("targets", []) for r in query_range(t["expr"])]
            series = [(name, [(float(ts), float(v)) for ts, v in values if v not in ("NaN", "+Inf", "-Inf")])
                      for name, values in series]
            series = [(name, points) for name, points in series if points]
            if not series:
                empty.append(panel.get("title", ""))
                ax.text(0.5, 0.5, "No data", ha="center", va="center", color="#9fa7b3", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            if panel.get("type") == "stat":
                ax.set_xticks([])
                ax.set_yticks([])
                text = "   ".join(f"{format_value(points[-1][1], unit)}" + (f"\n{name}" if len(series) > 1 else "")
                                  for name, points in series[:4])
                ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=20 if len(series) == 1 else 12,
                        color="#73bf69", weight="bold", transform=ax.transAxes)
                continue
            for name, points in series[:12]:
                times = [datetime.fromtimestamp(ts) for ts, _ in points]
                ax.plot(times, [v for _, v in points], linewidth=1.4, label=name)
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_value(v, unit)))
            ax.tick_params(labelsize=7, colors="#9fa7b3")
            ax.grid(color="#2c3235", linewidth=0.6)
            if (panel.get("fieldConfig") or {}).get("defaults", {}).get("min") == 0:
                ax.set_ylim(bottom=0)
            if any(name for name, _ in series):
                ax.legend(fontsize=7, loc="upper left", framealpha=0.3, ncol=2 if len(series) > 4 else 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, facecolor=fig.get_facecolor())
        plt.close(fig)
    return empty
