"""The HTTP boundary: typed errors map to OpenAI-shaped errors and status codes in one place."""

from __future__ import annotations


def test_overload_and_typed_errors_map_to_openai_errors_in_one_place():
    from ray.serve.exceptions import BackPressureError

    from experts.errors import UnknownExpertError
    from serving.api import OverloadedError, RequestError, error_of
    from serving.app import Ingress

    assert error_of(RequestError("too long", param="prompt"))[0] == 400
    status, body = error_of(UnknownExpertError("lgal", ["legal"]))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert error_of(OverloadedError("full"))[0] == 503
    assert error_of(RuntimeError("boom"))[0] == 500
    # Ray Serve's queue-full error becomes 503 + Retry-After, never a hang or a bare 500
    response = Ingress.func_or_class._error(
        None, BackPressureError(num_queued_requests=9, max_queued_requests=8), "r1"
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert b"at capacity" in response.body
