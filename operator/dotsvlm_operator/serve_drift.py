"""Pure: does the Ray head run the Serve config the operator wants? (drift detection)

The operator deploys its config with `PUT /api/serve/applications/`; someone may later deploy another
one by hand (`serve deploy`, a PUT of their own, `serve.run`). `GET /api/serve/applications/` shows what
the head runs: `applications.<name>.deployed_app_config` (the config as deployed, Serve's
`ServeApplicationSchema`). Ray may fill in defaults there, so the comparison asks whether everything
the operator sends is there with the same value (a subset), and names the first difference in words.
"""

from __future__ import annotations

from typing import Any

_MAX_VALUE_CHARS = 80


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "..."


_ABSENT = object()


def _first_difference(wanted: Any, running: Any, path: str) -> str | None:
    """The first place where `running` lacks or changes what `wanted` has, as 'path: the head runs X,
    the spec wants Y'; None when `wanted` is a subset of `running`."""
    if isinstance(wanted, dict):
        if not isinstance(running, dict):
            return f"{path or 'the config'}: the head runs {_show(running)}, the spec wants an object"
        for key, value in wanted.items():
            if value is None and running.get(key) is None:
                continue  # unset and null mean the same to Serve
            diff = _first_difference(value, running.get(key, _ABSENT), f"{path}.{key}" if path else str(key))
            if diff is not None:
                return diff
        return None
    if isinstance(wanted, list):
        if not isinstance(running, list) or len(running) != len(wanted):
            return f"{path}: the head runs {_show(running)}, the spec wants {_show(wanted)}"
        for i, (w, r) in enumerate(zip(wanted, running)):
            diff = _first_difference(w, r, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    if wanted == running and type(wanted) is type(running) or (
            isinstance(wanted, (int, float)) and isinstance(running, (int, float))
            and not isinstance(wanted, bool) and not isinstance(running, bool) and float(wanted) == float(running)):
        return None
    return f"{path}: the head runs {_show(running)}, the spec wants {_show(wanted)}"


def config_drift(body: dict[str, Any], deployed: dict[str, Any] | None) -> str | None:
    """What differs between the application the operator wants (in `body`, `serve_app.deploy_body`) and
    the one the head runs (`deployed`: its `deployed_app_config`); None when the head runs it.

    Call it only when the head runs the application: one missing altogether is deployed anyway. One the
    head runs without a recorded config (deployed by `serve.run`, not from a config) is drift.
    `http_options` are left out: Serve takes them only when it starts (a new head pod), not on a deploy."""
    wanted = (body.get("applications") or [{}])[0]
    if deployed is None:
        return "the head runs an application that was not deployed from a config (e.g. by serve.run)"
    return _first_difference({k: v for k, v in wanted.items() if k != "name"}, deployed, "")
