"""chunk_key: changes with every input the tensors depend on, stable otherwise."""

import numpy as np
import pytest
import torch

from store import KV_FORMAT_VERSION, chunk_key

BASE = dict(model_fingerprint="model-fp", prefix_ids=[1, 2], token_ids=[3, 4, 5])


def key(**changes):
    args = {**BASE, "kv_dtype": "float16", **changes}
    return chunk_key(args.pop("model_fingerprint"), args.pop("prefix_ids"), args.pop("token_ids"), **args)


def test_golden_key():
    # Freezes the encoding: a change here silently orphans every existing store.
    assert key().hex() == "3b057009c63791461fc92a24df9f6488b5fd20ec712cff63bf0155745a51b38d"
    assert key(kv_dtype="bfloat16", namespace="tenant-a").hex() == (
        "a4291bd332d4bf5590ced31693ec5d302e04b686d4f4621ff778f9045118f7ac"
    )


def test_key_is_32_stable_bytes():
    assert isinstance(key(), bytes) and len(key()) == 32
    assert key() == key() == key(namespace="", format_version=KV_FORMAT_VERSION)


@pytest.mark.parametrize(
    "change",
    [
        dict(model_fingerprint="model-fp2"),
        dict(prefix_ids=[1, 2, 0]),
        dict(prefix_ids=[]),
        dict(token_ids=[3, 4, 6]),
        dict(token_ids=[3, 4]),
        dict(kv_dtype="bfloat16"),
        dict(kv_dtype="float32"),
        dict(namespace="tenant-a"),
        dict(format_version=KV_FORMAT_VERSION + 1),
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values()))),
)
def test_key_changes_with_each_input(change):
    assert key(**change) != key()


def test_prefix_token_split_is_unambiguous():
    assert key(prefix_ids=[1, 2], token_ids=[3]) != key(prefix_ids=[1], token_ids=[2, 3])
    assert key(model_fingerprint="ab", namespace="c") != key(model_fingerprint="a", namespace="bc")


def test_id_container_type_does_not_matter():
    assert key(token_ids=np.array([3, 4, 5], dtype=np.int32)) == key()
    assert key(token_ids=torch.tensor([3, 4, 5])) == key() == key(token_ids=(3, 4, 5))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown kv_dtype 'fp16'"):
        key(kv_dtype="fp16")
    with pytest.raises(ValueError, match="token_ids must be a flat sequence of int64"):
        key(token_ids=[1.5])
    with pytest.raises(ValueError, match="must be str"):
        key(model_fingerprint=b"bytes")
