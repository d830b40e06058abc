"""The planner's core types: what a machine has, what a model is made of, and where it goes.

All are frozen dataclasses with a JSON round trip (``to_dict`` / ``from_dict``), so profiles of
machines we don't have, cached probes and plans handed to the executor are the same JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "CPUInfo",
    "GPUInfo",
    "Hardware",
    "TensorInfo",
    "Anatomy",
    "DevicePlan",
    "Prediction",
    "Plan",
    "PlanRequest",
    "Placement",
]


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a dataclass from a dict, ignoring keys it does not know (fields may be added)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class CPUInfo:
    """The host: cores, memory and measured memory bandwidth."""

    cores: int
    ram_bytes: int
    mem_bandwidth_Bps: float
    threads: int = 0
    ram_available_bytes: int = 0
    name: str = ""


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as the planner sees it."""

    name: str
    vram_bytes: int
    mem_bandwidth_Bps: float
    h2d_bandwidth_Bps: float
    index: int = 0
    vram_free_bytes: int = 0
    pcie_gen: int = 0
    pcie_width: int = 0
    compute_capability: str = ""
    fp16_flops: float = 0.0
    # Measured device-to-device copy bandwidth (read + write); the speed model uses the nominal
    # mem_bandwidth_Bps, as profiles of machines we don't have can only give that.
    mem_bandwidth_measured_Bps: float = 0.0
    # Measured host-to-device copy bandwidth from ordinary (pageable) memory, as from a mapped
    # model file; 0 where not measured.
    h2d_pageable_Bps: float = 0.0


@dataclass(frozen=True)
class Hardware:
    """A machine: measured (``offload hardware``) or a profile of one we don't have."""

    name: str
    cpu: CPUInfo
    gpus: tuple[GPUInfo, ...] = ()
    fingerprint: str = ""
    measured_at: str = ""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the published profile schema."""
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        """Inverse of ``to_dict``; unknown keys are ignored."""
        cpu = _from_dict(CPUInfo, data["cpu"])
        gpus = tuple(
            _from_dict(GPUInfo, {"index": i, **g}) for i, g in enumerate(data.get("gpus", []))
        )
        rest = {k: v for k, v in data.items() if k not in ("cpu", "gpus")}
        rest["notes"] = tuple(rest.get("notes", ()))
        return _from_dict(cls, {**rest, "cpu": cpu, "gpus": gpus})


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor: where it belongs and what it costs."""

    name: str
    layer: int | None
    role: str
    ggml_type: str
    nbytes: int
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Anatomy:
    """What a GGUF model is made of, read from its header alone."""

    path: str
    arch: str
    name: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_vocab: int
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    # KV cache bytes per token, per layer, at f16 (0 for layers without attention).
    kv_bytes_per_token_f16: tuple[int, ...] = ()
    # Per layer: the sliding window in tokens (0 = full attention).
    swa_window: tuple[int, ...] = ()
    recurrent_state_bytes: int = 0
    expert_count: int = 0
    expert_used_count: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    head_dim_k: int = 0
    head_dim_v: int = 0
    chat_template: str | None = None
    file_type: str = ""
    warnings: tuple[str, ...] = ()
    # Added by the planner's anatomy reader (issue 3).
    n_ff: int = 0
    n_ff_exp: int = 0
    # Per layer: "attention", "recurrent" (Mamba/SSM state instead of a KV cache) or "none".
    layer_kinds: tuple[str, ...] = ()
    # No output.weight: llama.cpp uses token_embd as the output matrix, copied where output goes.
    tied_embeddings: bool = False
    # Recurrent state bytes per sequence, per layer (f32 conv + ssm states; 0 for attention layers).
    recurrent_state_bytes_per_layer: tuple[int, ...] = ()
    kv_lora_rank: int = 0
    known_arch: bool = True

    @property
    def weights_bytes(self) -> int:
        """Bytes of all weight tensors."""
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Anatomy:
        """Inverse of ``to_dict``."""
        tensors = tuple(
            _from_dict(TensorInfo, {**t, "shape": tuple(t.get("shape", ()))})
            for t in data["tensors"]
        )
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return _from_dict(cls, {**conv, "tensors": tensors})


@dataclass(frozen=True)
class DevicePlan:
    """Memory placed on one device (the CPU is one, named ``"CPU"``)."""

    name: str
    kind: str  # "CPU" or "GPU"
    index: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        """Everything placed here."""
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, ``total_bytes`` included."""
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Prediction:
    """Predicted speeds of a plan."""

    decode_tps: float
    prompt_tps: float
    ttft_s: float


@dataclass(frozen=True)
class Plan:
    """Where every tensor goes and how llama.cpp runs it; the executor applies it exactly."""

    devices: tuple[DevicePlan, ...]
    n_gpu_layers: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    threads: int
    threads_batch: int
    predicted: Prediction
    reasons: tuple[str, ...] = ()
    cpu_tensor_patterns: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    split_mode: str = "layer"  # none | layer | row
    main_gpu: int = 0
    n_parallel: int = 1
    kv_type: str = "f16"  # type_k and type_v
    flash_attn: bool = False
    offload_kqv: bool = True
    op_offload: bool = True
    use_mmap: bool = True
    use_mlock: bool = False
    optimize: str = "balanced"
    model_path: str = ""
    hardware_fingerprint: str = ""
    # llama.cpp's own n_ctx: the per-sequence n_ctx times n_parallel (what the executor passes).
    n_ctx_total: int = 0
    # Full-size SWA cache (llama-cpp-python 0.3.36's default); False keeps only window + ubatch cells.
    swa_full: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the published ``offload plan --json`` shape."""
        d = asdict(self)
        d["devices"] = [dev.to_dict() for dev in self.devices]
        for k in ("reasons", "cpu_tensor_patterns", "tensor_split"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of ``to_dict``."""
        devices = tuple(_from_dict(DevicePlan, dev) for dev in data["devices"])
        predicted = _from_dict(Prediction, data["predicted"])
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return _from_dict(cls, {**conv, "devices": devices, "predicted": predicted})


@dataclass(frozen=True)
class PlanRequest:
    """What the caller asks of a plan: context, parallelism, budgets and user overrides.

    ``None`` means "decide for me". Budgets are bytes; ``gpu_budget_bytes`` caps each GPU (how
    ``OFFLOAD_GPU_MEMORY`` / ``--gpu-memory`` emulate a smaller card).
    """

    n_ctx: int | None = None
    n_parallel: int = 1
    optimize: str = "balanced"  # decode | prompt | balanced
    gpu_budget_bytes: int | None = None
    ram_budget_bytes: int | None = None
    gpu_margin_bytes: int = 512 << 20
    num_gpu: int | None = None  # forced whole layers on GPU (Ollama's num_gpu)
    kv_type: str | None = None
    flash_attn: bool | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    threads: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool = False
    # Prompt length the prompt speed and TTFT are predicted for (pp2048 as in GPU.md's n_ubatch test).
    prompt_tokens: int = 2048
    # Largest context planned when n_ctx is not given: Ollama's default 4096 keeps the runtime's
    # behaviour; raise it to let the planner pick the longest context (up to the model's training
    # context) that fits and costs at most 3% decode speed.
    max_ctx: int = 4096
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """One concrete way to run a model: the knobs llama.cpp takes, before any prediction.

    ``n_ctx`` is per sequence (Ollama's ``num_ctx``); llama.cpp's context is ``n_ctx * n_parallel``.
    ``threads == 0`` means the machine's physical cores.
    """

    n_gpu_layers: int
    cpu_tensor_patterns: tuple[str, ...] = ()
    n_ctx: int = 4096
    n_parallel: int = 1
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int = 0
    threads_batch: int = 0
    kv_type: str = "f16"
    flash_attn: bool = False
    offload_kqv: bool = True
    op_offload: bool = True
    tensor_split: tuple[float, ...] = ()
    swa_full: bool = True
    # CPU-resident weights loaded into the GPU driver's pinned host memory instead of mapped from
    # the file: op offload copies them to the GPU for prompt processing several times faster.
    pinned_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["cpu_tensor_patterns"] = list(self.cpu_tensor_patterns)
        d["tensor_split"] = list(self.tensor_split)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        """Inverse of ``to_dict``."""
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return _from_dict(cls, conv)
