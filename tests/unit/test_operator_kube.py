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
