"""Schemathesis fuzzes every operation of the OpenAPI schema with valid and invalid requests: none may
get a 5xx. The app runs the tiny model with tight limits, so a generated query decodes at most 4 tokens.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from chunkcache.server import Limits, ServerSettings, create_app

from .test_server import open_store_pipeline

FUZZ_LIMITS = Limits(max_question_chars=200, max_new_tokens=4, max_top_k=4, max_documents=4,
                     max_document_chars=300, max_logprobs=5, max_messages=8, max_check_layer=8,
                     max_body_bytes=64 * 1024)
KEY = "fuzz-key"
# (method, path, examples per generation mode): the model-running operations get the most.
OPERATIONS = [("POST", "/query", 40), ("POST", "/v1/chat/completions", 60), ("GET", "/v1/models", 5),
              ("GET", "/v1/models/{model}", 10), ("GET", "/healthz", 3), ("GET", "/health", 3), ("GET", "/version", 3),
              ("GET", "/metrics", 3), ("POST", "/v1/completions", 40), ("POST", "/v1/embeddings", 15),
              ("POST", "/tokenize", 15), ("POST", "/detokenize", 15)]
PARAMETERLESS = ("/healthz", "/health", "/version")


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory, tiny_lm, hash_embedder):
    # top_k 2 by default: the store holds 3 chunks (a larger default top_k is refused by the pipeline).
    pipe = open_store_pipeline(tmp_path_factory.mktemp("fuzz"), tiny_lm, hash_embedder, top_k=2)
    app = create_app(pipe, ServerSettings(limits=FUZZ_LIMITS, api_keys={KEY: "fuzzer"}))
    # With keys configured the schema, like the API, needs one.
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})
    pipe.close()


def test_every_operation_is_fuzzed(fuzz_schema):
    listed = {(r.ok().method.upper(), r.ok().path) for r in fuzz_schema.get_all_operations()}
    assert listed == {(method, path) for method, path, _ in OPERATIONS}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("method, path, examples", OPERATIONS, ids=lambda v: str(v).strip("/"))
def test_no_request_gets_a_5xx(fuzz_schema, method, path, examples, mode):
    if mode == GenerationMode.NEGATIVE and path in PARAMETERLESS:
        pytest.skip("no parameters or credentials to make invalid")
    operation = fuzz_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error])

    check()
