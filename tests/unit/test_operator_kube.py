"""The API adapter's one decision: when a failed apply may be fixed by re-creating the object."""

from __future__ import annotations

import json


def test_only_clashes_with_the_live_object_are_fixed_by_re_creating() -> None:
    from kubernetes.client.rest import ApiException

    from dotsvlm_operator.kube import _replaceable

    def err(status, message, causes=()):
        return ApiException(status=status, body=json.dumps({"message": message, "details": {"causes": list(causes)}}))

    assert _replaceable(err(422, 'Service "x" is invalid: spec.ports[1].name: Duplicate value: "http"',
                            [{"reason": "FieldValueDuplicate"}]))
    assert _replaceable(err(422, "Deployment.apps \"x\" is invalid: spec.selector: field is immutable"))
    assert not _replaceable(err(422, "ValidatingAdmissionPolicy 'p' with binding 'b' denied request: no",
                                [{"reason": "FieldValueInvalid"}]))
    assert not _replaceable(err(403, "forbidden"))


def test_annotating_a_pod_that_is_gone_is_not_an_error() -> None:
    from unittest import mock

    from kubernetes.client.rest import ApiException

    from dotsvlm_operator.kube import Kube

    k = Kube(api=mock.MagicMock())
    with mock.patch.object(k, "_call", side_effect=ApiException(status=404)):
        assert k.patch_pod_annotations("ns", "gone", {"a": "1"}) is False
    with mock.patch.object(k, "_call", return_value={}):
        assert k.patch_pod_annotations("ns", "here", {"a": "1"}) is True
    with mock.patch.object(k, "_call", side_effect=ApiException(status=403)):
        try:
            k.patch_pod_annotations("ns", "x", {"a": "1"})
        except ApiException as exc:
            assert exc.status == 403
        else:
            raise AssertionError("a refusal must not be swallowed")


def _apply_with(answers: dict[str, list]) -> tuple[list[str], BaseException | None]:
    """Kube.apply against scripted answers per HTTP method (an exception is raised, anything else returned):
    the methods it called, in order, and what it raised."""
    from unittest import mock

    from dotsvlm_operator.kube import Kube

    calls: list[str] = []

    def call(method, path, **kw):
        calls.append(method + (" dry-run" if ("dryRun", "All") in (kw.get("query") or []) else ""))
        answer = answers[calls[-1]].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    k = Kube(api=mock.MagicMock())
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d-vision", "namespace": "ns"}}
    with mock.patch.object(k, "_call", side_effect=call):
        try:
            k.apply(obj)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            return calls, exc
    return calls, None


def _invalid(message: str) -> BaseException:
    from kubernetes.client.rest import ApiException

    return ApiException(status=422, body=json.dumps({"message": message,
                                                     "details": {"causes": [{"reason": "FieldValueInvalid"}]}}))


def test_an_invalid_object_of_ours_never_deletes_the_live_one() -> None:
    # The spec gives the pool a node label value the API server refuses: the apply fails, and so would creating
    # the object anew (the dry-run create says so): the running Deployment is kept, the refusal is raised.
    refusal = _invalid('Deployment.apps "d-vision" is invalid: spec.template.spec.nodeSelector: Invalid value: '
                       '"vvvv": must be no more than 63 characters')
    calls, raised = _apply_with({"PATCH": [refusal], "GET": [{"kind": "Deployment"}],
                                 "POST dry-run": [_invalid("the same refusal")]})
    assert raised is refusal
    assert "DELETE" not in calls, calls


def test_a_live_object_in_the_way_is_re_created() -> None:
    from kubernetes.client.rest import ApiException

    # An immutable field differs (the live selector): a new object would be accepted (the dry-run create finds only
    # that the name is taken), so the live one is replaced.
    immutable = _invalid('Deployment.apps "d-vision" is invalid: spec.selector: field is immutable')
    calls, raised = _apply_with({"PATCH": [immutable, {"kind": "Deployment"}], "GET": [{"kind": "Deployment"}],
                                 "POST dry-run": [ApiException(status=409, reason="AlreadyExists")], "DELETE": [{}]})
    assert raised is None
    assert calls == ["PATCH", "GET", "POST dry-run", "DELETE", "PATCH"], calls
