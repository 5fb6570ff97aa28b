"""Write the chart's monitoring files from code: `python -m dotsvlm_operator.monitoring.generate [CHART_DIR]`.

- `files/alerts.yaml` from `alerts.py`;
- `files/dashboards/<name>.json` from `dashboards.py` (needs the dev extra: grafana-foundation-sdk).
Unit tests fail when the committed files differ from what this writes (`make monitoring` rewrites them).
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_CHART = Path(__file__).resolve().parents[3] / "charts" / "dotsvlm-operator"


def outputs() -> dict[str, str]:
    """Relative path in the chart -> file content."""
    from dotsvlm_operator.monitoring import alerts, dashboards

    files = {"files/alerts.yaml": alerts.alerts_file()}
    for name, text in dashboards.dashboard_files().items():
        files[f"files/dashboards/{name}.json"] = text
    return files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    chart = Path(args[0]) if args else DEFAULT_CHART
    wanted = outputs()
    stale = chart / "files" / "dashboards"
    if stale.is_dir():
        for f in stale.glob("*.json"):
            if f"files/dashboards/{f.name}" not in wanted:
                f.unlink()
    for rel, text in wanted.items():
        path = chart / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
