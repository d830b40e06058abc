"""``create``: build a model in the store from a Modelfile, as Ollama does.

FROM a GGUF file imports it as the model blob; FROM a model name reuses that model's layers and
inherits its template, system, parameters, messages, license and adapters unless the Modelfile
overrides them (parameters merge key by key). Quantizing needs llama.cpp, which this package may
not import: the caller passes a ``quantizer``. The manifest is deterministic (no timestamps), so
the same Modelfile and files always give the same model ID.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.models import gotemplate
from offload.models.errors import InvalidQuantization, ModelError, StoreError
from offload.models.layout import (
    MAX_LAYERS,
    MAX_TEXT_BYTES,
    MEDIA_ADAPTER,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    open_temp,
    read_capped,
    sha256_file,
)
from offload.models.modelfile import (
    ROLES,
    Modelfile,
    ModelfileError,
    ModelfileTooLarge,
    parse_modelfile,
)
from offload.models.names import ModelName, parse_name
from offload.models.sources import is_path, model_file
from offload.models.store import Store
from offload.models.template_limits import TemplateTooLarge
from offload.planner.errors import GGUFError
from offload.planner.gguf_header import GGUFHeader, read_header

__all__ = [
    "FILE_TYPES",
    "CheckedSources",
    "Quantizer",
    "check_quantize",
    "check_sources",
    "create",
    "file_type_name",
    "gguf_config",
    "quant_type",
]

log = logging.getLogger(__name__)

#: (source GGUF, destination GGUF, llama.cpp file type number) -> None.
Quantizer = Callable[[Path, Path, int], None]
Progress = Callable[[dict[str, Any]], None]

#: llama.cpp's ``llama_ftype`` numbers by the names users type (``ollama create --quantize``).
FILE_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22,
    "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29,
    "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}  # fmt: skip
_UNQUANTIZED = {0, 1, 32}
_LAYER_ORDER = [MEDIA_MODEL, MEDIA_PROJECTOR, MEDIA_ADAPTER, MEDIA_TEMPLATE, MEDIA_SYSTEM,
                MEDIA_LICENSE, MEDIA_PARAMS, MEDIA_MESSAGES]  # fmt: skip


def _noop(_: dict[str, Any]) -> None:
    pass


def file_type_name(number: int | None) -> str:
    """``Q4_K_M`` for 15; ``unknown`` when absent."""
    for k, v in FILE_TYPES.items():
        if v == number:
            return k
    return "unknown"


def quant_type(name: str) -> int:
    """The llama.cpp file type for a name like ``q4_K_M`` (any case); raise on unknown names."""
    key = name.strip().upper()
    if key not in FILE_TYPES:
        raise InvalidQuantization(
            f"unknown quantization {json.dumps(name[:40])}, expected one of {', '.join(FILE_TYPES)}"
        )
    return FILE_TYPES[key]


def _human_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def gguf_config(path: Path, header: GGUFHeader | None = None) -> dict[str, Any]:
    """The config-blob fields Ollama derives from a GGUF header (family, size, file type)."""
    h = header or read_header(path)
    md = h.metadata
    arch = str(md.get("general.architecture", "unknown"))
    n_params = 0
    for t in h.tensors:
        count = 1
        for d in t.shape:
            count *= d
        n_params += count
    return {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch],
        "model_type": _human_count(n_params),
        "file_type": file_type_name(md.get("general.file_type")),
    }


def _import_file(store: Store, path: Path, media: str, report: Progress) -> dict[str, Any]:
    digest = sha256_file(path)
    if store.has_blob(digest):
        report({"status": f"using existing layer {digest}"})
    else:
        report({"status": f"creating new layer {digest}"})
        store.add_blob_file(path, expected=digest)
    return {"mediaType": media, "digest": digest, "size": path.stat().st_size}


def _text_layer(store: Store, media: str, data: bytes, report: Progress) -> dict[str, Any]:
    layer = store.layer_for_bytes(media, data)
    report({"status": f"using layer {layer['digest']}"})
    return layer


@dataclass(frozen=True)
class CheckedSources:
    """What a Modelfile's FROM and ADAPTER lines resolved to, every file checked."""

    model_file: Path | None  # FROM a file
    base: tuple[Store, dict[str, Any]] | None  # FROM a model: its store and manifest
    header: GGUFHeader  # the model's checked header
    adapters: tuple[Path, ...]


def _messages_data(mf: Modelfile) -> bytes:
    msgs = [{"role": m.role, "content": m.content} for m in mf.messages]
    return json.dumps(msgs, separators=(",", ":")).encode()


def _params_data(params: dict[str, Any]) -> bytes:
    return json.dumps(params, sort_keys=True, separators=(",", ":")).encode()


def _check_values(mf: Modelfile) -> None:
    """What the Modelfile itself says fits its layers: messages, and every text layer's size."""
    for i, m in enumerate(mf.messages):
        if not isinstance(m.role, str) or m.role not in ROLES:
            raise ModelfileError(
                f"MESSAGE {i + 1}: role {json.dumps(m.role, default=str)[:40]} is not one of "
                f"{', '.join(ROLES)}"
            )
        if not isinstance(m.content, str):
            raise ModelfileError(
                f"MESSAGE {i + 1}: content must be text, not {type(m.content).__name__}"
            )
    texts: list[tuple[str, bytes]] = []
    if mf.template is not None:
        texts.append(("TEMPLATE", mf.template.encode()))
    if mf.system is not None:
        texts.append(("SYSTEM", mf.system.encode()))
    texts += [("LICENSE", lic.encode()) for lic in mf.licenses]
    if mf.parameters:
        texts.append(("the PARAMETERs", _params_data(mf.parameters)))
    if mf.messages:
        texts.append(("the MESSAGEs", _messages_data(mf)))
    for what, data in texts:
        if len(data) > MAX_TEXT_BYTES:
            raise ModelfileTooLarge(
                f"{what} is {len(data)} bytes, more than the {MAX_TEXT_BYTES} a layer may hold"
            )


def _check_layer_count(mf: Modelfile, base: dict[str, Any] | None) -> None:
    replaced = {
        MEDIA_TEMPLATE: mf.template is not None,
        MEDIA_SYSTEM: mf.system is not None,
        MEDIA_LICENSE: bool(mf.licenses),
        MEDIA_PARAMS: bool(mf.parameters),
        MEDIA_MESSAGES: bool(mf.messages),
    }
    kept = [x for x in base["layers"] if not replaced.get(x["mediaType"])] if base else [None]
    count = (
        len(kept)
        + len(mf.adapters)
        + len(mf.licenses)
        + sum(replaced[m] for m in (MEDIA_TEMPLATE, MEDIA_SYSTEM, MEDIA_PARAMS, MEDIA_MESSAGES))
    )
    if count > MAX_LAYERS:
        raise ModelfileError(
            f"the model would have {count} layers, more than the {MAX_LAYERS} allowed "
            "(each LICENSE and ADAPTER is a layer)"
        )


def check_sources(
    store: Store,
    mf: Modelfile,
    *,
    base_dir: Path,
    allowed_dirs: Sequence[Path] | None = None,
    quantize: str | None = None,
) -> CheckedSources:
    """Check everything a Modelfile names, writing nothing; ``ModelfileError`` naming the line.

    With ``quantize``, also that the model can be quantized to that type (``InvalidQuantization``).
    """
    from_line = mf.lines.get("FROM")
    _check_values(mf)
    if mf.template is not None:
        try:
            gotemplate.parse(mf.template)
        except TemplateTooLarge as e:
            raise ModelfileTooLarge(f"TEMPLATE: {e.problem}", mf.lines.get("TEMPLATE")) from None
        except gotemplate.TemplateError as e:
            start = mf.lines.get("TEMPLATE")
            line = start + e.line - 1 if start and e.line else start
            raise ModelfileError(f"TEMPLATE does not parse: {e.problem}", line) from None
    adapters = tuple(
        model_file(a, base_dir, "ADAPTER", mf.lines.get(f"ADAPTER{i}"), allowed_dirs)[0]
        for i, a in enumerate(mf.adapters)
    )
    if is_path(mf.from_, base_dir, allowed_dirs):
        path, header = model_file(mf.from_, base_dir, "FROM", from_line, allowed_dirs)
        _check_layer_count(mf, None)
        if quantize:
            check_quantize(header, quantize)
        return CheckedSources(path, None, header, adapters)
    try:
        holder, raw = store.locate_manifest(mf.from_)
        manifest = holder._parse(parse_name(mf.from_), raw)
    except ModelError as e:
        raise ModelfileError(f"FROM {mf.from_}: {e}", from_line) from None
    model = next((x for x in manifest["layers"] if x["mediaType"] == MEDIA_MODEL), None)
    blob = holder.find_blob(model["digest"]) if model else None
    if blob is None:
        raise ModelfileError(f"FROM {mf.from_}: that model has no weights layer", from_line)
    path = blob
    try:
        header = read_header(path)
    except GGUFError as e:
        raise ModelfileError(f"FROM {mf.from_}: {e.problem}", from_line) from None
    _check_layer_count(mf, manifest)
    if quantize:
        check_quantize(header, quantize)
    return CheckedSources(None, (holder, manifest), header, adapters)


def _base_params(store: Store, digest: str, name: str) -> dict[str, Any]:
    p = store.find_blob(digest)
    try:
        params = json.loads(read_capped(p, MAX_TEXT_BYTES, "parameters")) if p else None
    except (OSError, StoreError, ValueError, UnicodeDecodeError):
        params = None
    if not isinstance(params, dict):
        raise ModelfileError(f"FROM {name}: that model's parameters are unreadable")
    return params


def create(
    store: Store,
    name: str | ModelName,
    modelfile: Modelfile | str,
    *,
    base_dir: Path | None = None,
    quantize: str | None = None,
    quantizer: Quantizer | None = None,
    progress: Progress | None = None,
    allowed_dirs: Sequence[Path] | None = None,
) -> str:
    """Create ``name`` from a Modelfile (text or parsed); return the new manifest's digest.

    ``allowed_dirs`` is None for the user's own files (CLI, library); for a request over HTTP it
    lists the only folders FROM and ADAPTER files may come from (see ``offload.models.sources``).
    Every file is checked before anything is written, so a refused create leaves nothing behind.
    """
    report = progress or _noop
    mn = parse_name(name) if isinstance(name, str) else name
    base_dir = Path(base_dir or Path.cwd())
    report({"status": "parsing modelfile"})
    mf = parse_modelfile(modelfile) if isinstance(modelfile, str) else modelfile
    checked = check_sources(
        store, mf, base_dir=base_dir, allowed_dirs=allowed_dirs, quantize=quantize
    )
    if quantize:
        _check_quantizable(checked.header, quantize, quantizer)
    from_line = mf.lines.get("FROM")

    inherited: dict[str, list[dict[str, Any]]] = {}
    base_params: dict[str, Any] = {}
    if checked.model_file is not None:
        model_layer = _import_file(store, checked.model_file, MEDIA_MODEL, report)
        inherited[MEDIA_MODEL] = [model_layer]
    else:
        assert checked.base is not None
        holder, manifest = checked.base
        for layer in manifest["layers"]:
            inherited.setdefault(layer["mediaType"], []).append(layer)
            if holder is not store and not store.blob_path(layer["digest"]).is_file():
                # Blobs from the read-only Ollama store are copied so our manifest is whole.
                store.add_blob_file(holder.blob_path(layer["digest"]), expected=layer["digest"])
        if MEDIA_PARAMS in inherited:
            base_params = _base_params(store, inherited[MEDIA_PARAMS][0]["digest"], mf.from_)

    model_path = store.find_blob(inherited[MEDIA_MODEL][0]["digest"])
    assert model_path is not None
    header = checked.header
    if quantize:
        inherited[MEDIA_MODEL] = [_quantize(store, model_path, quantize, quantizer, report)]
        model_path = store.find_blob(inherited[MEDIA_MODEL][0]["digest"])
        assert model_path is not None
        header = read_header(model_path)

    layers: dict[str, list[dict[str, Any]]] = dict(inherited)
    for path in checked.adapters:
        layers.setdefault(MEDIA_ADAPTER, []).append(
            _import_file(store, path, MEDIA_ADAPTER, report)
        )
    if mf.template is not None:
        layers[MEDIA_TEMPLATE] = [_text_layer(store, MEDIA_TEMPLATE, mf.template.encode(), report)]
    if mf.system is not None:
        layers[MEDIA_SYSTEM] = [_text_layer(store, MEDIA_SYSTEM, mf.system.encode(), report)]
    if mf.licenses:
        layers[MEDIA_LICENSE] = [
            _text_layer(store, MEDIA_LICENSE, lic.encode(), report) for lic in mf.licenses
        ]
    if mf.parameters:
        params = {**base_params, **mf.parameters}
        data = _params_data(params)
        layers[MEDIA_PARAMS] = [_text_layer(store, MEDIA_PARAMS, data, report)]
    if mf.messages:
        data = _messages_data(mf)
        layers[MEDIA_MESSAGES] = [_text_layer(store, MEDIA_MESSAGES, data, report)]

    ordered = [layer for media in _LAYER_ORDER for layer in layers.get(media, [])]
    ordered += [layer for media, ls in layers.items() if media not in _LAYER_ORDER for layer in ls]
    try:
        config = gguf_config(model_path, header)
    except GGUFError as e:
        raise ModelfileError(f"FROM {mf.from_}: {e.problem}", from_line) from None
    config["rootfs"] = {"type": "layers", "diff_ids": [layer["digest"] for layer in ordered]}
    report({"status": "writing manifest"})
    digest = store.write_manifest(mn, store.new_manifest(ordered, config))
    report({"status": "success"})
    log.info("created %s (%s)", mn.full, digest)
    return digest


def check_quantize(header: GGUFHeader, quantize: str) -> int:
    """The llama.cpp file type to quantize to; ``InvalidQuantization`` for an unknown type or a
    model that is already quantized (only F16, BF16 and F32 weights can be quantized)."""
    ftype = quant_type(quantize)
    current = header.metadata.get("general.file_type")
    if current not in _UNQUANTIZED:
        raise InvalidQuantization(
            f"quantize: only F16, BF16 or F32 models can be quantized, this one is "
            f"{file_type_name(current)}; create from its unquantized weights instead"
        )
    return ftype


def _check_quantizable(header: GGUFHeader, quantize: str, quantizer: Quantizer | None) -> int:
    ftype = check_quantize(header, quantize)
    if quantizer is None:
        raise ModelError("quantize: no quantizer available in this build")
    return ftype


def _quantize(
    store: Store, src: Path, quantize: str, quantizer: Quantizer | None, report: Progress
) -> dict[str, Any]:
    header = read_header(src)
    ftype = _check_quantizable(header, quantize, quantizer)
    assert quantizer is not None
    current = header.metadata.get("general.file_type")
    report({"status": f"quantizing {file_type_name(current)} model to {file_type_name(ftype)}"})
    # A locked temporary file: if this process dies mid-quantize, the store prunes it.
    f, tmp = open_temp(store.root / ".tmp")
    try:
        quantizer(src, tmp, ftype)
        read_header(tmp)
        return _import_file(store, tmp, MEDIA_MODEL, report)
    finally:
        f.close()
        tmp.unlink(missing_ok=True)
