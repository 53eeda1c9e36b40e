"""The HTTP boundary: typed errors map to OpenAI-shaped errors and status codes in one place."""

from __future__ import annotations


def test_overload_and_typed_errors_map_to_openai_errors_in_one_place():
    from ray.serve.exceptions import BackPressureError

    from experts.errors import UnknownExpertError
    from serving.api import OverloadedError, RequestError, error_of
    from serving.ingress import error_response

    assert error_of(RequestError("too long", param="prompt"))[0] == 400
    status, body = error_of(UnknownExpertError("lgal", ["legal"]))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert error_of(OverloadedError("full"))[0] == 503
    assert error_of(RuntimeError("boom"))[0] == 500
    # Ray Serve's queue-full error becomes 503 + Retry-After, never a hang or a bare 500
    response = error_response(BackPressureError(num_queued_requests=9, max_queued_requests=8), "r1")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert b"at capacity" in response.body


def test_a_request_failing_mid_stream_ends_with_an_error_event():
    import asyncio
    import json

    from experts.errors import ArtifactError
    from serving.engine import Delta
    from serving.ingress import error_response
    from serving.openai_format import events as openai_events

    meta = {"id": "cmpl-r7", "created": 0, "model": "legal"}

    def events(error: Exception) -> tuple[list[str], list[tuple]]:
        async def rest():
            yield Delta(" world", 2)
            yield Delta("", 2, "error", error)
            yield Delta("never sent", 3)

        done: list[tuple] = []
        stream = openai_events(
            rest(), Delta("hello", 1), meta, {}, [], False, 3, lambda *a: done.append(a), error_response
        )

        async def collect() -> list[str]:
            return [event async for event in stream]

        return asyncio.run(collect()), done

    sent, done = events(RuntimeError("probability tensor contains nan"))
    bodies = [json.loads(e.removeprefix("data: ")) for e in sent]
    assert [b["choices"][0]["text"] for b in bodies[:-1]] == ["", "hello", " world"]
    assert bodies[-1]["error"]["type"] == "server_error" and "request id r7" in bodies[-1]["error"]["message"]
    assert "nan" not in bodies[-1]["error"]["message"]  # internals stay in the server log
    assert done == [("hello world", 2, 500, "server_error")]
    sent, done = events(ArtifactError("expert 'legal': cannot load adapter from x: size mismatch"))
    error = json.loads(sent[-1].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable" and "cannot load adapter" in error["message"]
    assert done == [("hello world", 2, 503, "service_unavailable")]


def test_typed_errors_survive_the_trip_from_the_pool():
    import pickle

    from experts.errors import ArtifactError, UnknownExpertError
    from serving.api import RequestError, error_of

    for exc in [
        UnknownExpertError("lgal", ["legal"]),
        RequestError("bad", param="prompt"),
        ArtifactError("x"),
    ]:
        back = pickle.loads(pickle.dumps(exc))  # how Ray Serve carries a Delta's error
        assert type(back) is type(exc) and error_of(back) == error_of(exc)
