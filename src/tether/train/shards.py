"""Sharded tensors on disk through torch.distributed.checkpoint (DCP), without pickle: every process writes its own
shards of every tensor, nothing is gathered, and reading runs no code whatever the files say.

DCP's default storage (`FileSystemWriter`/`FileSystemReader`) keeps its metadata (`.metadata`) as a pickle and
every tensor as a `torch.save` blob, both unpickled on reading. tether uses torch's safetensors storage instead:
`HuggingFaceStorageWriter(save_distributed=True)` writes, for process R, one file
`shard-{R+1:05d}-model-00001-of-00001.safetensors` holding its chunks of every tensor (each chunk's offsets in the
file's JSON header), and `HuggingFaceStorageReader` rebuilds DCP's metadata from those headers alone. A directory
holding any other file (a `.metadata` or `.distcp` pickle, planted or not) is refused before anything in it is
opened (`check_shards`). Reading lays the chunks out as the reading tensors are sharded: the same processes, other
process counts, or one process with whole tensors (`tether export` of a sharded checkpoint)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

SHARD_FILE = re.compile(r"shard-\d{5}-model-00001-of-00001\.safetensors")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save_shards(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (name -> tensor, sharded DTensors or whole) into `directory`, each process its own shards
    (a collective: every process calls it with the same names). Raises on a failed write on any process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP's note that one process saves alone
        dcp.save({name: t.detach() for name, t in tensors.items()}, storage_writer=writer, no_dist=not _distributed())


def shard_files(directory: Path) -> list[Path]:
    """The shard files of `directory`; raises ValueError on anything else in it (a pickle is never opened)."""
    found = sorted(Path(directory).iterdir())
    for p in found:
        if not SHARD_FILE.fullmatch(p.name) or p.is_symlink() or not p.is_file():
            raise ValueError(f"{directory.name}/ holds {p.name!r}, which is not a shard file (a pickle is never read)")
    if not found:
        raise ValueError(f"{directory.name}/ holds no shard file")
    return found


def check_shards(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `directory` holds exactly `expected`'s tensors (their full shapes and dtypes, every
    element in one chunk), read from the files' headers alone (a torn file fails here)."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    shard_files(directory)
    try:
        stored = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a torn or foreign header
        raise ValueError(f"{directory.name}/: unreadable shard header ({type(e).__name__}: {e})") from None
    if stored.keys() != expected.keys():
        missing, extra = len(expected.keys() - stored.keys()), len(stored.keys() - expected.keys())
        raise ValueError(f"{directory.name}/ does not match the model ({missing} tensors missing, {extra} foreign)")
    for name, meta in stored.items():
        want = expected[name]
        elements = sum(int(torch.Size(c.sizes).numel()) for c in meta.chunks)
        if tuple(meta.size) != tuple(want.shape) or meta.properties.dtype != want.dtype or elements != want.numel():
            raise ValueError(
                f"tensor {name} is stored as {meta.properties.dtype} {tuple(meta.size)} in {elements} elements, "
                f"the model has {want.dtype} {tuple(want.shape)}"
            )


def load_shards(directory: Path, targets: dict[str, torch.Tensor]) -> None:
    """Copy the stored tensors into `targets` (name -> tensor, in place; each process reads the chunks its own
    shards need; a collective when distributed). Check the directory with `check_shards` first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    shard_files(directory)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP's note that one process loads alone
        dcp.load(
            {name: t.detach() for name, t in targets.items()},
            storage_reader=HuggingFaceStorageReader(str(directory)),
            no_dist=not _distributed(),
        )
