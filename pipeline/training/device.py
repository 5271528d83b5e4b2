"""Start-up check of the GPU against the chosen precision: what it is, which attention kernel it gets, and
whether the precision can run there at all.

The templates target V100s (compute capability 7.0, "sm_70"). On them:
- bf16 has no hardware support. ``torch.cuda.is_bf16_supported()`` still answers True there (it counts
  emulation), so DeepSpeed accepts a bf16 config and the run is many times slower: refused here, naming the fp16
  configs instead.
- ``F.scaled_dot_product_attention`` runs the memory-efficient kernel in fp16; flash and cuDNN attention need
  sm_80+.
- ``--compile`` compiles fp16 graphs, but Triton has no Volta tensor-core path: the matmuls stay cuBLAS and
  compilation only fuses the element-wise work around them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

# Native bf16 arithmetic (tensor cores and element-wise) arrived with Ampere.
NATIVE_BF16_CAPABILITY = (8, 0)
# PyTorch's SDPA hardware limits (torch/csrc/aten/native/transformers/cuda/sdp_utils.cpp): flash attention and
# cuDNN attention need sm_80+ and fp16/bf16; the memory-efficient kernel runs from sm_50, in fp32 and fp16, and in
# bf16 only from sm_80. Restated here because torch only answers "which kernel" for CUDA tensors already on the
# device (torch.backends.cuda.can_use_flash_attention), which this check must not need.
FLASH_CAPABILITY = (8, 0)
MEM_EFFICIENT_CAPABILITY = (5, 0)
FP16_CONFIGS = ("zero1_fp16.json", "zero2_fp16.json", "zero3_fp16.json", "multinode_zero2_fp16.json")


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as the check sees it."""

    name: str
    """Device name, e.g. "Tesla V100-SXM2-32GB"."""
    capability: tuple[int, int]
    """Compute capability (major, minor); (7, 0) for a V100."""

    def __post_init__(self):
        if len(self.capability) != 2 or min(self.capability) < 0:
            raise ConfigError(f"compute capability must be (major, minor), got {self.capability!r}")

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def native_bf16(self) -> bool:
        return tuple(self.capability) >= NATIVE_BF16_CAPABILITY


def current_gpu(index: int | None = None) -> GpuInfo:
    """The CUDA device ``index`` (default: the current one) as a GpuInfo."""
    import torch

    index = torch.cuda.current_device() if index is None else index
    return GpuInfo(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def compute_dtype_of(precision: str) -> str:
    """The dtype attention and the matmuls run in for a precision label of ``precision_of`` (fp16, bf16,
    bf16-autocast, fp16-autocast, fp32)."""
    return precision.split("-")[0]


def sdpa_kernel(gpu: GpuInfo, dtype: str) -> str:
    """The kernel ``F.scaled_dot_product_attention`` picks on ``gpu`` for ``dtype`` inputs (no dropout-free or
    head-size corner cases: the presets' head size is 64). Torch tries flash, then memory-efficient, then math."""
    capability = tuple(gpu.capability)
    if dtype in ("fp16", "bf16") and capability >= FLASH_CAPABILITY:
        return "flash"
    if capability >= MEM_EFFICIENT_CAPABILITY and (dtype != "bf16" or capability >= NATIVE_BF16_CAPABILITY):
        return "memory-efficient"
    return "math"


def check_gpu(gpu: GpuInfo, precision: str, ds_config_path: str, compile_layers: bool = False) -> list[str]:
    """Raises ConfigError when ``precision`` cannot run natively on ``gpu``; else returns the lines to log."""
    dtype = compute_dtype_of(precision)
    if dtype == "bf16" and not gpu.native_bf16:
        raise ConfigError(
            f"{ds_config_path}: {precision} needs native bf16 (compute capability 8.0+, A100/H100), but "
            f"{gpu.name} is {gpu.sm}; use an fp16 config instead: "
            + ", ".join(f"ds_configs/{name}" for name in FP16_CONFIGS))
    lines = [f"GPU {gpu.name}: compute capability {gpu.capability[0]}.{gpu.capability[1]} ({gpu.sm}), "
             f"precision {precision}, attention: SDPA {sdpa_kernel(gpu, dtype)} kernel in {dtype}"]
    if compile_layers and not gpu.native_bf16:
        lines.append(f"torch.compile on {gpu.sm}: {dtype} graphs; Triton has no tensor-core path before sm_80, "
                     "so the matmuls stay cuBLAS and compilation fuses only the element-wise work")
    return lines


def check_device(accelerator_name: str, precision: str, ds_config_path: str,
                 compile_layers: bool = False) -> list[str]:
    """The start-up check of the trainer: on CUDA, ``check_gpu`` for the current device; elsewhere nothing."""
    if accelerator_name != "cuda":
        return []
    return check_gpu(current_gpu(), precision, ds_config_path, compile_layers)
