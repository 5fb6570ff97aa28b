"""`dotsvlm check-redis` and `dotsvlm cleanup-redis` turn Ray's fatal Redis errors into a sentence that says what to fix."""

from __future__ import annotations

import argparse

import pytest

from dotsvlm_serving import redis_state

# What Ray 2.60 prints before it aborts (redis_store_client.cc), shortened.
_WRONGPASS = ("[2026-12-03 14:30:01,736 C 7936 7936] redis_store_client.cc:547:  An unexpected system state has "
              "occurred. You have likely discovered a bug in Ray. Check failed: context.Connect(options.ip, "
              "options.port, options.username, options.password, options.enable_ssl) Status not OK: RedisError: "
              "WRONGPASS invalid username-password pair or user is disabled. Failed to connect to Redis.\n"
              "*** StackTrace Information ***\n/usr/lib/ray/_raylet.so(+0x1812b9a) ray::operator<<()\n")
_UNREACHABLE = ("[... E ...] redis_context.cc:556: 120 attempts to connect have all failed.\n[... C ...] "
                "Check failed: context.Connect(...) Status not OK: RedisError: Could not establish connection to "
                "Redis 10.0.0.9:6379 (context.err = 1). Failed to connect to Redis.\n*** StackTrace Information ***\n")


@pytest.mark.parametrize("stderr, says, hint", [
    (_WRONGPASS, "WRONGPASS invalid username-password pair", "passwordSecretRef"),
    (_UNREACHABLE, "Could not establish connection to Redis 10.0.0.9:6379", "redisAddress"),
    ("Status not OK: RedisError: Failed to get Redis cluster info\n", "cluster info", "does Redis need a password"),
])
def test_rays_redis_errors_are_quoted_with_what_to_check(stderr: str, says: str, hint: str) -> None:
    text = redis_state.explain_failure(-6, stderr)
    assert says in text and hint in text and "StackTrace" not in text


def test_other_failures_quote_the_last_line() -> None:
    assert redis_state.explain_failure(1, "Traceback\nModuleNotFoundError: No module named 'ray'\n") == \
        "exited with code 1: ModuleNotFoundError: No module named 'ray'"


@pytest.mark.parametrize("address", ["redis", ":6379", "redis:port"])
def test_an_address_without_a_port_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        redis_state.split_address(address)


def test_without_settings_the_command_says_what_it_needs(monkeypatch, capsys) -> None:
    monkeypatch.delenv(redis_state.REDIS_ADDRESS_ENV, raising=False)
    monkeypatch.delenv(redis_state.STORAGE_NAMESPACE_ENV, raising=False)
    assert redis_state.cleanup_main(argparse.Namespace(address=None, storage_namespace=None)) == 2
    assert "--address" in capsys.readouterr().err
    assert redis_state.cleanup_main(argparse.Namespace(address="redis:6379", storage_namespace=None)) == 2
    assert "--storage-namespace" in capsys.readouterr().err
    assert redis_state.check_main(argparse.Namespace(address="redis")) == 2
    assert "not host:port" in capsys.readouterr().err
