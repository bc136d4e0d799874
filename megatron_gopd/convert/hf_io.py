"""Reading and writing Hugging Face checkpoint directories (safetensors, sharded or not).

Reading is lazy: :class:`HFWeights` maps names to tensors read from disk on access, so a converter
holds one copy of the weights, not two.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_gopd.utils import GopdError

__all__ = [
    "HFShardWriter",
    "HFWeights",
    "atomic_output_dir",
    "copy_tokenizer_files",
    "tokenizer_vocab_size",
    "write_hf_checkpoint",
]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files that travel with a model but are not weights or its config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class HFWeights(Mapping):
    """Lazy name -> tensor view of an HF model directory's weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise GopdError(f"{self.path} is not a directory")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._names: dict[Path, set[str]] = {}
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise GopdError(f"{index} is not a valid shard index: {e}") from None
                missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
                if missing:
                    raise GopdError(
                        f"{len(missing)} shard file(s) listed in {index_name} are missing, "
                        f"e.g. {missing[0]}"
                    )
                self._where = {k: self.path / f for k, f in weight_map.items()}
                break
        else:
            files = sorted(self.path.glob("*.safetensors")) or sorted(
                self.path.glob("pytorch_model*.bin")
            )
            if not files:
                raise GopdError(
                    f"{self.path} holds no weights (*.safetensors or pytorch_model.bin)"
                )
            for f in files:
                for k in self._keys_of(f):
                    self._where[k] = f

    def _keys_of(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            return list(self._open(f).keys())
        return list(self._load_bin(f).keys())

    def _open(self, f: Path):
        from safetensors import safe_open

        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:
                raise GopdError(f"cannot read {f}: {e}") from None
        return self._handles[f]

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bin_cache:
            try:
                self._bin_cache[f] = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # zip and pickle errors of every kind
                raise GopdError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
        return self._bin_cache[f]

    def _names_in(self, f: Path) -> set[str]:
        if f not in self._names:
            self._names[f] = set(self._open(f).keys())
        return self._names[f]

    def _absent(self, key: str, f: Path) -> GopdError:
        return GopdError(
            f"{key} is not in {f.name}, where the shard index of {self.path} says it is: the "
            f"index and the shards do not match"
        )

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where[key]
        if f.suffix == ".safetensors":
            handle = self._open(f)
            if key not in self._names_in(f):
                raise self._absent(key, f)
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise GopdError(f"cannot read {key} from {f.name}: {e}") from None
        weights = self._load_bin(f)
        if key not in weights:
            raise self._absent(key, f)
        return weights[key]

    def shape_of(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        if f.suffix == ".safetensors":
            if key not in self._names_in(f):
                raise self._absent(key, f)
            return tuple(self._open(f).get_slice(key).get_shape())
        weights = self._load_bin(f)
        if key not in weights:
            raise self._absent(key, f)
        return tuple(weights[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def tokenizer_vocab_size(path: str | Path) -> int | None:
    """``len(tokenizer)`` of the HF directory's tokenizer, or None if it has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(path)))
    except Exception:
        return None


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class HFShardWriter:
    """Streams tensors into ``save_pretrained``-style safetensors shards of at most
    ``max_shard_bytes`` (one shard in memory at a time), then writes the index and config."""

    def __init__(self, out: str | Path, *, max_shard_bytes: int = 5 * 1024**3):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + n > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        fname = f"shard-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self.out / fname), metadata={"format": "pt"})
        self._files.append((fname, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self, config: dict, *, tokenizer_dir: str | Path | None = None) -> None:
        if self._pending or not self._files:
            self._flush()
        if len(self._files) == 1:
            os.replace(self.out / self._files[0][0], self.out / "model.safetensors")
        else:
            weight_map = {}
            for i, (fname, names) in enumerate(self._files, 1):
                final = f"model-{i:05d}-of-{len(self._files):05d}.safetensors"
                os.replace(self.out / fname, self.out / final)
                weight_map.update(dict.fromkeys(names, final))
            (self.out / SAFE_INDEX).write_text(
                json.dumps(
                    {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                    indent=2,
                )
            )
        (self.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, self.out)


def write_hf_checkpoint(
    out: str | Path,
    state: Mapping[str, torch.Tensor],
    config: dict,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """``save_pretrained``-compatible directory: safetensors shards (+ index), config, tokenizer."""
    writer = HFShardWriter(out, max_shard_bytes=max_shard_bytes)
    for k, t in state.items():
        writer.add(k, t)
    writer.close(config, tokenizer_dir=tokenizer_dir)


def atomic_output_dir(out: str | Path):
    """Context manager: yields a temporary sibling directory that replaces ``out`` on success and
    is removed on failure, so no half-written output directory is ever left behind."""
    import contextlib
    import tempfile

    out = Path(out)

    @contextlib.contextmanager
    def _cm():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            if out.exists():
                if any(out.iterdir()):
                    raise GopdError(f"{out} exists and is not empty")
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return _cm()
