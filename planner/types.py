"""The planner's core types: what a machine has, what a model is made of, and where it goes.

All are frozen dataclasses with a JSON round trip (``to_dict`` / ``from_dict``), so profiles of
machines we don't have, cached probes and plans handed to the executor are the same JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from offload.planner.errors import WorkloadError

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
    "Workload",
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
    # FFN widths: dense, and one expert's.
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
    """Predicted speeds of a plan.

    ``decode_tps`` and ``prompt_tps`` are one stream's; ``request_s`` is the predicted time of the
    workload's typical request (prompt / prompt_tps + answer / decode_tps);
    ``aggregate_decode_tps`` is all ``n_parallel`` streams decoding together.
    """

    decode_tps: float
    prompt_tps: float
    ttft_s: float
    request_s: float = 0.0
    aggregate_decode_tps: float = 0.0


# Longest prompt or answer a workload may name: beyond any model's context.
MAX_WORKLOAD_TOKENS = 1 << 22


@dataclass(frozen=True)
class Workload:
    """The request a plan is made for: ``prompt_tokens`` in, ``answer_tokens`` out.

    ``source`` says where the figures come from: ``default`` (nothing known yet), ``recorded``
    (medians of the requests this model served; ``requests`` of them) or ``requested``.
    """

    prompt_tokens: int = 1024
    answer_tokens: int = 256
    source: str = "default"
    requests: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "answer_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WORKLOAD_TOKENS:
                raise WorkloadError(
                    f"a workload's {name.replace('_', ' ')} must be a whole number from 1 to "
                    f"{MAX_WORKLOAD_TOKENS}, not {v!r}"
                )

    def request_s(self, prediction: Prediction) -> float:
        """Predicted seconds of one such request under ``prediction``."""
        return self.prompt_tokens / max(prediction.prompt_tps, 1e-9) + self.answer_tokens / max(
            prediction.decode_tps, 1e-9
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        """Inverse of ``to_dict``."""
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Placement:
    """One concrete way to run a model: every knob llama.cpp takes, before any prediction.

    ``n_ctx`` is per sequence (Ollama's ``num_ctx``); llama.cpp's context is ``n_ctx * n_parallel``
    cells of one unified KV cache. ``threads == 0`` means the machine's physical cores.
    ``tensor_split`` is what llama.cpp takes: relative shares of the offloaded layers per GPU (the
    planner writes whole-layer counts, which llama.cpp's float arithmetic splits exactly).
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
    split_mode: str = "layer"  # none | layer | row
    main_gpu: int = 0
    # Tensors moved onto a GPU other than their layer's: (pattern, GPU index) pairs, applied before
    # ``cpu_tensor_patterns`` (llama.cpp takes the first override a tensor name matches). With
    # several GPUs, this fills the room a whole-layer split leaves on a card with tensors that
    # would otherwise stay on the CPU.
    gpu_tensor_patterns: tuple[tuple[str, int], ...] = ()
    # None: map the file unless the weights are pinned (pinned memory needs them read in).
    use_mmap: bool | None = None
    use_mlock: bool = False

    @property
    def n_ctx_total(self) -> int:
        """llama.cpp's own n_ctx: the per-sequence context times the sequences."""
        return self.n_ctx * max(self.n_parallel, 1)

    @property
    def mmap(self) -> bool:
        """Whether llama.cpp maps the model file (``use_mmap`` resolved)."""
        return (not self.pinned_weights) if self.use_mmap is None else self.use_mmap

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["cpu_tensor_patterns"] = list(self.cpu_tensor_patterns)
        d["gpu_tensor_patterns"] = [[p, g] for p, g in self.gpu_tensor_patterns]
        d["tensor_split"] = list(self.tensor_split)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        """Inverse of ``to_dict``; unknown keys are ignored."""
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "gpu_tensor_patterns" in conv:
            conv["gpu_tensor_patterns"] = _gpu_patterns(conv["gpu_tensor_patterns"])
        return _from_dict(cls, conv)


def _gpu_patterns(value: Any) -> tuple[tuple[str, int], ...]:
    """``gpu_tensor_patterns`` from JSON: a list of [pattern, GPU index] pairs."""
    out = []
    for item in value or ():
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not isinstance(item[0], str)
            or isinstance(item[1], bool)
            or not isinstance(item[1], int)
            or item[1] < 0
        ):
            raise ValueError(
                f"gpu_tensor_patterns: each entry is [pattern, GPU index], not {item!r}"
            )
        out.append((item[0], int(item[1])))
    return tuple(out)


_KNOBS = frozenset(f.name for f in fields(Placement))


def _knob(name: str) -> property:
    def get(self: Plan) -> Any:
        return getattr(self.placement, name)

    get.__doc__ = f"``placement.{name}``."
    return property(get)


@dataclass(frozen=True, init=False)
class Plan:
    """A placement with what it costs and gains: memory per device, predicted speed, and why.

    The knobs live in ``placement``; ``plan.n_gpu_layers`` and the others read through to it, and
    ``Plan(...)`` / ``dataclasses.replace(plan, ...)`` accept them by name as well, so callers that
    knew the knobs as the plan's own fields keep working. ``to_dict`` writes them flat, in the
    published ``offload plan --json`` shape.
    """

    devices: tuple[DevicePlan, ...]
    placement: Placement
    predicted: Prediction
    reasons: tuple[str, ...] = ()
    optimize: str = "workload"
    model_path: str = ""
    hardware_fingerprint: str = ""
    workload: Workload = field(default_factory=Workload)

    def __init__(
        self,
        devices: tuple[DevicePlan, ...],
        predicted: Prediction,
        placement: Placement | None = None,
        reasons: tuple[str, ...] = (),
        optimize: str = "workload",
        model_path: str = "",
        hardware_fingerprint: str = "",
        workload: Workload | None = None,
        **knobs: Any,
    ) -> None:
        knobs.pop("n_ctx_total", None)  # derived from n_ctx and n_parallel
        unknown = set(knobs) - _KNOBS
        if unknown:
            raise TypeError(f"Plan() got unexpected keyword arguments {sorted(unknown)}")
        if placement is None:
            placement = Placement(**{"n_gpu_layers": 0, **knobs})
        elif knobs:
            changed = {k: v for k, v in knobs.items() if getattr(placement, k) != v}
            placement = replace(placement, **changed) if changed else placement
        if placement.use_mmap is None:  # a plan says what llama.cpp gets
            placement = replace(placement, use_mmap=placement.mmap)
        set_ = object.__setattr__
        set_(self, "devices", tuple(devices))
        set_(self, "placement", placement)
        set_(self, "predicted", predicted)
        set_(self, "reasons", tuple(reasons))
        set_(self, "optimize", optimize)
        set_(self, "model_path", model_path)
        set_(self, "hardware_fingerprint", hardware_fingerprint)
        set_(self, "workload", workload or Workload())

    n_gpu_layers = _knob("n_gpu_layers")
    cpu_tensor_patterns = _knob("cpu_tensor_patterns")
    gpu_tensor_patterns = _knob("gpu_tensor_patterns")
    n_ctx = _knob("n_ctx")
    n_parallel = _knob("n_parallel")
    n_batch = _knob("n_batch")
    n_ubatch = _knob("n_ubatch")
    threads = _knob("threads")
    threads_batch = _knob("threads_batch")
    kv_type = _knob("kv_type")
    flash_attn = _knob("flash_attn")
    offload_kqv = _knob("offload_kqv")
    op_offload = _knob("op_offload")
    tensor_split = _knob("tensor_split")
    swa_full = _knob("swa_full")
    pinned_weights = _knob("pinned_weights")
    split_mode = _knob("split_mode")
    main_gpu = _knob("main_gpu")
    use_mlock = _knob("use_mlock")
    n_ctx_total = _knob("n_ctx_total")

    @property
    def use_mmap(self) -> bool:
        """Whether llama.cpp maps the model file."""
        return self.placement.mmap

    def with_knobs(self, **changes: Any) -> Plan:
        """A copy with placement knobs (``n_ctx=...``) and plan fields (``devices=...``) changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the published ``offload plan --json`` shape (knobs flat)."""
        d: dict[str, Any] = {
            "devices": [dev.to_dict() for dev in self.devices],
            **self.placement.to_dict(),
            "use_mmap": self.use_mmap,
            "n_ctx_total": self.n_ctx_total,
            "predicted": asdict(self.predicted),
            "reasons": list(self.reasons),
            "optimize": self.optimize,
            "model_path": self.model_path,
            "hardware_fingerprint": self.hardware_fingerprint,
            "workload": self.workload.to_dict(),
        }
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of ``to_dict``; also reads plans written before the placement was nested."""
        devices = tuple(_from_dict(DevicePlan, dev) for dev in data["devices"])
        predicted = _from_dict(Prediction, data["predicted"])
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in _KNOBS}
        if "pinned_weights" not in knobs:
            # Older plans: llama.cpp puts CPU weights in pinned memory when it reads the file in
            # (no mmap) and a GPU backend is present.
            knobs["pinned_weights"] = data.get("use_mmap") is False and any(
                d.kind == "GPU" for d in devices
            )
        workload = data.get("workload")
        return cls(
            devices=devices,
            predicted=predicted,
            placement=Placement.from_dict({"n_gpu_layers": 0, **knobs}),
            reasons=tuple(data.get("reasons", ())),
            optimize=data.get("optimize", "workload"),
            model_path=data.get("model_path", ""),
            hardware_fingerprint=data.get("hardware_fingerprint", ""),
            workload=Workload.from_dict(workload) if isinstance(workload, dict) else None,
        )


@dataclass(frozen=True)
class PlanRequest:
    """What the caller asks of a plan: context, parallelism, budgets, workload and overrides.

    ``None`` means "decide for me". Budgets are bytes as nvidia-smi counts them: a GPU budget caps
    everything the process holds on that GPU (CUDA context included), one figure for every GPU
    or one per GPU; 0 keeps the GPUs out of the plan.
    """

    n_ctx: int | None = None
    # None: the planner chooses (up to 4 sequences when their KV cache costs at most 5% decode).
    n_parallel: int | None = 1
    optimize: str = "workload"  # workload | decode | prompt ("balanced" reads as workload)
    gpu_budget_bytes: int | tuple[int, ...] | None = None
    ram_budget_bytes: int | None = None
    gpu_margin_bytes: int = 512 << 20
    num_gpu: int | None = None  # forced whole layers on GPU (Ollama's num_gpu)
    # None: f16, quantized (q8_0, then q4_0) only when the context cannot fit in f16.
    kv_type: str | None = None
    flash_attn: bool | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    threads: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool = False
    # The typical request the default mode plans for; None: 1024 prompt + 256 answer tokens.
    workload: Workload | None = None
    # Prompt length the shown prompt speed and TTFT are predicted for; None: the workload's.
    prompt_tokens: int | None = None
    # Largest context planned when n_ctx is not given: Ollama's default 4096 keeps the runtime's
    # behaviour; raise it to let the planner pick the longest context (up to the model's training
    # context) that fits and costs little decode speed (search.CONTEXT_MAX_DECODE_LOSS).
    max_ctx: int = 4096
    extra: dict[str, Any] = field(default_factory=dict)
