"""The one tensor hash (ntksap.hashing.tensor_digest) and the dataset caches built on it."""

import hashlib

import pytest
import torch

from ntksap import data
from ntksap.hashing import tensor_digest


def test_digest_is_sha256_of_names_shapes_dtypes_and_bytes():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    h = hashlib.sha256()
    for name in ("b", "w"):  # sorted by name
        t = a[name]
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    assert tensor_digest(a) == h.hexdigest() and len(h.hexdigest()) == 64
    assert tensor_digest({"b": a["b"], "w": a["w"]}) == tensor_digest(a)        # insertion order is irrelevant
    assert tensor_digest({"w": a["w"].T.contiguous().T, "b": a["b"]}) == tensor_digest(a)  # layout too


@pytest.mark.parametrize("change", [
    lambda a: {"v": a["w"], "b": a["b"]},                                # a name
    lambda a: {"w": a["w"].reshape(3, 2), "b": a["b"]},                  # a shape
    lambda a: {"w": a["w"].double(), "b": a["b"]},                       # a dtype
    lambda a: {"w": a["w"] + torch.eye(2, 3), "b": a["b"]},              # a value
    lambda a: {"w": a["w"]},                                             # a tensor less
])
def test_any_change_changes_the_digest(change):
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2])}
    assert tensor_digest(change(a)) != tensor_digest(a)


def test_odd_tensors_and_bad_input():
    odd = {"bool": torch.tensor([True, False]), "bf16": torch.ones(3, dtype=torch.bfloat16),
           "scalar": torch.tensor(2.5, requires_grad=True), "empty": torch.zeros(0, 4)}
    assert tensor_digest(odd) == tensor_digest({k: v.clone() for k, v in odd.items()})
    with pytest.raises(ValueError, match="mapping name -> tensor"):
        tensor_digest([("w", torch.ones(1))])
    with pytest.raises(ValueError, match=r"tensors\['w'\] must be a torch.Tensor"):
        tensor_digest({"w": [1.0]})


def test_cache_checksum_is_the_tensor_digest_and_an_older_cache_is_rebuilt(tmp_path):
    b = data.get_dataset("digits", root=tmp_path)
    cache = tmp_path / "digits" / "cache-sklearn.pt"
    obj = torch.load(cache, weights_only=True)
    assert obj["version"] == data.CACHE_VERSION
    assert obj["checksum"] == tensor_digest({k: obj[k] for k in data.CACHE_TENSORS})
    obj["version"] = data.CACHE_VERSION - 1    # a cache from before the checksum changed
    torch.save(obj, cache)
    with pytest.warns(UserWarning, match=rf"is version {data.CACHE_VERSION - 1} of 'digits', expected "
                                         rf"{data.CACHE_VERSION} of 'digits'; rebuilding it"):
        again = data.get_dataset("digits", root=tmp_path)
    assert torch.equal(again.train_images, b.train_images)
    assert torch.load(cache, weights_only=True)["version"] == data.CACHE_VERSION
