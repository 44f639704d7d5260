"""Find a model or adapter on disk: local folders, ``package:NAME``, hub ids, and GGUF files.

A GGUF base is dequantized to fp32 once (transformers + gguf) into a cache folder, which is then streamed like
any HF folder. Hub ids go through huggingface_hub, which honours HF_HUB_OFFLINE and its own cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from loracook.errors import BadInput


def cache_dir() -> Path:
    return Path(os.environ.get("LORACOOK_CACHE", Path.home() / ".cache" / "loracook"))


def resolve_path(value: str, *, revision: str | None = None, kind: str = "model") -> Path:
    """Turn a recipe path (already resolved against the recipe folder) into a local folder."""
    if value.startswith("package:"):
        return package_dir(value.removeprefix("package:"))
    path = Path(value)
    if path.exists() or path.is_absolute() or value.startswith("."):
        return path
    return _hub_snapshot(value, revision, kind)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"package {name!r} is not installed", fix=f"pip install {name.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def _hub_snapshot(repo_id: str, revision: str | None, kind: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise BadInput(f"{repo_id!r} is not a local folder and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError:
        raise BadInput(
            f"{kind} {repo_id!r} is neither a local folder nor in the hub cache (offline)",
            fix="download it first or give a local path",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise BadInput(f"cannot fetch {kind} {repo_id!r} from the hub: {str(exc).splitlines()[0]}") from None


def open_gguf_base(folder: Path, gguf_file: str, *, dequantize: bool):
    """The base model in ``folder/gguf_file`` as a Checkpoint.

    ``dequantize=True`` (``run``: tensors will be read): the fp32 HF folder, converted once into the cache.
    ``dequantize=False`` (``validate``, ``plan``: headers only): that folder if it is already cached, else a
    header-only view read from the GGUF header (config, names and shapes; no tensor data, nothing written)."""
    from loracook.io.checkpoint import gguf_header_checkpoint, open_checkpoint

    source = _gguf_source(folder, gguf_file)
    cached = _gguf_target(source)
    if (cached / "config.json").is_file():
        return open_checkpoint(cached)
    if not dequantize:
        return gguf_header_checkpoint(source)
    return open_checkpoint(gguf_to_folder(folder, gguf_file))


def _gguf_source(folder: Path, gguf_file: str) -> Path:
    source = folder / gguf_file
    if not source.is_file():
        raise BadInput("GGUF file not found", file=source, fix="check base.path and base.gguf_file")
    return source


def _gguf_target(source: Path) -> Path:
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{source.stem}-{key}"


def gguf_to_folder(folder: Path, gguf_file: str) -> Path:
    """Dequantize ``folder/gguf_file`` to an fp32 HF folder once; later calls return the cached folder.

    The cache must be writable (LORACOOK_CACHE, default ~/.cache/loracook): if it is not, one line says so and
    how to point it elsewhere, before any work. Staging folders are named like outputs' temporary folders, so a
    conversion killed half-way is removed by the next one."""
    from loracook.io.writer import sweep_stale, temp_prefix

    source = _gguf_source(folder, gguf_file)
    target = _gguf_target(source)
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    except OSError as exc:
        raise BadInput(
            f"cannot write the cache for the dequantized GGUF model: {exc.strerror}",
            file=exc.filename or target.parent,
            fix="set LORACOOK_CACHE to a writable folder (the model is converted there once)",
        ) from None
    try:
        _convert_gguf(folder, gguf_file, staging)
        try:
            staging.rename(target)
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except ImportError as exc:
        raise BadInput(f"reading GGUF needs the gguf package ({exc})", fix="pip install gguf") from None
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise BadInput(
            f"cannot read GGUF: {reason}",
            file=folder / gguf_file,
            fix="check that the file is a complete GGUF model with its tokenizer",
        ) from None
    # save_pretrained refuses a model loaded through a quantizer until the flag is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
