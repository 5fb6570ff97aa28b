"""Optional API keys: `Authorization: Bearer <key>` checked against the keys in an environment variable
(comma-separated; the variable's name comes from ServeAppConfig.api.api_keys_env, fed from a Secret)."""

from __future__ import annotations

import hmac
import os

from .errors import ApiError


class ApiKeyAuth:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def from_env(cls, env_name: str | None) -> "ApiKeyAuth":
        raw = os.environ.get(env_name, "") if env_name else ""
        return cls([k.strip() for k in raw.split(",") if k.strip()])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        if not authorization:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self._keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
