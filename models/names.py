"""Model names: ``[host/][namespace/]model[:tag]`` as Ollama spells them."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from offload.models.errors import InvalidModelName

__all__ = ["HF_HOST", "DEFAULT_HOST", "DEFAULT_NAMESPACE", "DEFAULT_TAG", "ModelName", "parse_name"]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
HF_HOST = "hf.co"
# Hugging Face serves GGUF repos over the registry protocol at hf.co; these spell the same host.
_HF_ALIASES = {"hf.co", "huggingface.co", "www.huggingface.co"}

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# The host (with its port) is a folder of the store: no longer than a file name may be.
_MAX_HOST_CHARS = 255


@dataclass(frozen=True, order=True)
class ModelName:
    """A fully qualified model name; every part is safe to use as a path component."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def display(self) -> str:
        """The short form users type: default host and namespace left out."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        if self.host == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        """host/namespace/model:tag."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def repository(self) -> str:
        """namespace/model, the registry's repository path."""
        return f"{self.namespace}/{self.model}"

    def manifest_parts(self) -> tuple[str, str, str, str]:
        """Path components of the manifest under ``manifests/``."""
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        return self.display


def parse_name(name: str) -> ModelName:
    """Parse and validate a model name; raise ``InvalidModelName`` on anything unsafe."""
    raw = name
    if not isinstance(name, str) or not name.strip():
        raise InvalidModelName(str(raw), "it is empty")
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise InvalidModelName(raw, f"it holds a control character (U+{ord(control):04X})")
    if name != name.strip():
        raise InvalidModelName(raw, "it begins or ends with whitespace")
    if "\\" in name or name.startswith("/") or any(c.isspace() for c in name):
        raise InvalidModelName(raw, "use host/namespace/model:tag with no spaces or backslashes")
    tag = DEFAULT_TAG
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        base, tag = name.rsplit(":", 1)
    else:
        base = name
    parts = base.split("/")
    if len(parts) == 1:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        if parts[0].lower() in _HF_ALIASES:
            raise InvalidModelName(raw, "Hugging Face names are hf.co/user/repo[:quant]")
        host, namespace, model = DEFAULT_HOST, parts[0], parts[1]
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        raise InvalidModelName(raw, "too many '/' parts (expected [host/][namespace/]model[:tag])")
    if len(host) > _MAX_HOST_CHARS:
        raise InvalidModelName(raw, f"the host is longer than {_MAX_HOST_CHARS} characters")
    if not _HOST.fullmatch(host) or ".." in host:
        raise InvalidModelName(raw, f"bad host {host!r}")
    for label, value in (("namespace", namespace), ("model", model)):
        if not _PART.fullmatch(value) or value in (".", "..") or ".." in value:
            raise InvalidModelName(
                raw, f"bad {label} {value!r} (letters, digits, '.', '_', '-'; no '..')"
            )
    if not _TAG.fullmatch(tag) or ".." in tag:
        raise InvalidModelName(raw, f"bad tag {tag!r}")
    host = host.lower()
    if host in _HF_ALIASES:
        # Hugging Face repo names keep their case (the quant tag too): hf.co/unsloth/Qwen3-GGUF:Q4_K_M.
        return ModelName(HF_HOST, namespace, model, tag)
    return ModelName(host, namespace.lower(), model.lower(), tag)
