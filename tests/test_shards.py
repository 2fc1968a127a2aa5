"""Sharded checkpoint storage (tether.train.shards): torch.distributed.checkpoint over safetensors, read back without
unpickling anything. One process here (whole tensors, no process group); the 2-process FSDP2 checkpoints, their
resume and a kill during a sharded write are in tests/test_fsdp_checkpoints.py.

The planted pickles are live: unpickling one creates a marker file (torch's default DCP reader, given the same
directory, does unpickle `.metadata` and so creates it — the contrast is part of the test)."""

import os
import pickle
import shutil

import pytest
import torch

from tether.train.shards import check_shards, load_shards, save_shards


class Payload:
    """Unpickling this runs os.system: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(5, 3, generator=g), "layer.bias": torch.randn(5, generator=g).bfloat16()}


def test_round_trip_and_checks(tmp_path):
    saved = tensors()
    save_shards(tmp_path / "w", saved)
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]
    check_shards(tmp_path / "w", saved)
    targets = {k: torch.zeros_like(v) for k, v in saved.items()}
    load_shards(tmp_path / "w", targets)
    assert all(torch.equal(targets[k], saved[k]) for k in saved)  # bit for bit, dtypes kept
    with pytest.raises(ValueError, match="1 tensors missing"):
        check_shards(tmp_path / "w", {**saved, "other": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"layer.weight is stored as torch.float32 \(5, 3\)"):
        check_shards(tmp_path / "w", {**saved, "layer.weight": torch.zeros(3, 5)})


@pytest.mark.parametrize("planted", [".metadata", "__0_0.distcp"])
def test_a_planted_pickle_is_refused_and_never_unpickled(tmp_path, planted):
    save_shards(tmp_path / "w", tensors())
    marker = tmp_path / "unpickled"
    (tmp_path / "w" / planted).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=f"holds '{planted}', which is not a shard file"):
        check_shards(tmp_path / "w", tensors())
    with pytest.raises(ValueError, match="not a shard file"):
        load_shards(tmp_path / "w", {k: torch.zeros_like(v) for k, v in tensors().items()})
    assert not marker.exists()
    if planted == ".metadata":  # what the default reader of torch.distributed.checkpoint does with it
        import torch.distributed.checkpoint as dcp

        with pytest.raises(BaseException):  # noqa: B017 - DCP's CheckpointException: the payload has run by then
            dcp.load(tensors(), storage_reader=dcp.FileSystemReader(str(tmp_path / "w")), no_dist=True)
        assert marker.exists()


def test_a_pickle_in_place_of_a_shard_is_refused_and_never_unpickled(tmp_path):
    save_shards(tmp_path / "w", tensors())
    marker = tmp_path / "unpickled"
    shard = tmp_path / "w" / "shard-00001-model-00001-of-00001.safetensors"
    shard.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="unreadable shard header"):
        check_shards(tmp_path / "w", tensors())
    assert not marker.exists()


def test_a_torn_shard_is_refused(tmp_path):
    save_shards(tmp_path / "w", tensors())
    shard = tmp_path / "w" / "shard-00001-model-00001-of-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 7])
    with pytest.raises(ValueError, match="unreadable shard header"):
        check_shards(tmp_path / "w", tensors())
    shutil.rmtree(tmp_path / "w")
    (tmp_path / "w").mkdir()
    with pytest.raises(ValueError, match="holds no shard file"):
        check_shards(tmp_path / "w", tensors())
