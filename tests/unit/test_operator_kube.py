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
