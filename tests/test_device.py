"""The GPU start-up check (pipeline/training/device.py) with the device mocked: no GPU is needed.

torch.cuda's device queries are replaced by a V100 (sm_70), an A100 (sm_80) or an H100 (sm_90), and each guard
and each log line is checked: bf16 refused on sm_70 in one line naming fp16 configs that exist, the SDPA kernel
per capability and dtype, the --compile note on Volta.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.training import device
from pipeline.training.device import GpuInfo, check_device, check_gpu, sdpa_kernel

REPO = Path(__file__).resolve().parent.parent
V100 = ("Tesla V100-SXM2-32GB", (7, 0))
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0))
H100 = ("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.fixture
def mock_gpu(monkeypatch):
    """Makes torch.cuda report one device with the given name and capability (and bf16 'supported' by
    emulation, as torch answers on a V100)."""
    def install(name: str, capability: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return install


def test_v100_fp16_logs_capability_and_memory_efficient_attention(mock_gpu):
    mock_gpu(*V100)
    lines = check_device("cuda", "fp16", "ds_configs/zero2_fp16.json")
    assert lines == ["GPU Tesla V100-SXM2-32GB: compute capability 7.0 (sm_70), precision fp16, "
                     "attention: SDPA memory-efficient kernel in fp16"]


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_v100_refuses_bf16_in_one_line_naming_fp16_configs(mock_gpu, precision):
    mock_gpu(*V100)
    assert torch.cuda.is_bf16_supported()  # what DeepSpeed asks: it would accept bf16 here
    with pytest.raises(ConfigError) as error:
        check_device("cuda", precision, "ds_configs/zero2_bf16.json")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"ds_configs/zero2_bf16.json: {precision} needs native bf16 (compute capability "
                              "8.0+, A100/H100), but Tesla V100-SXM2-32GB is sm_70; use an fp16 config instead: ")
    named = [part.strip() for part in message.split("instead: ")[1].split(",")]
    assert named == [f"ds_configs/{name}" for name in device.FP16_CONFIGS]


def test_fp16_configs_named_by_the_refusal_exist_and_are_fp16():
    import json
    for name in device.FP16_CONFIGS:
        config = json.loads((REPO / "ds_configs" / name).read_text())
        assert config["fp16"]["enabled"] is True and not config.get("bf16", {}).get("enabled"), name


@pytest.mark.parametrize("gpu, precision, kernel", [
    (A100, "bf16", "flash"), (H100, "bf16-autocast", "flash"), (A100, "fp16", "flash"),
    (H100, "fp32", "memory-efficient"), (V100, "fp32", "memory-efficient"), (V100, "fp16", "memory-efficient"),
])
def test_bf16_accepted_on_ampere_and_later_with_the_kernel_sdpa_picks(mock_gpu, gpu, precision, kernel):
    mock_gpu(*gpu)
    lines = check_device("cuda", precision, "cfg.json")
    major, minor = gpu[1]
    dtype = precision.split("-")[0]
    assert lines == [f"GPU {gpu[0]}: compute capability {major}.{minor} (sm_{major}{minor}), precision {precision}, "
                     f"attention: SDPA {kernel} kernel in {dtype}"]


def test_sdpa_kernel_table():
    assert sdpa_kernel(GpuInfo("P100", (6, 0)), "fp16") == "memory-efficient"
    assert sdpa_kernel(GpuInfo("K80", (3, 7)), "fp16") == "math"  # below the memory-efficient kernel's sm_50
    assert sdpa_kernel(GpuInfo("V100", (7, 0)), "bf16") == "math"  # memory-efficient bf16 needs sm_80
    assert sdpa_kernel(GpuInfo("T4", (7, 5)), "fp16") == "memory-efficient"
    assert sdpa_kernel(GpuInfo("A10", (8, 6)), "bf16") == "flash"


def test_compile_on_volta_says_matmuls_stay_cublas(mock_gpu):
    mock_gpu(*V100)
    lines = check_device("cuda", "fp16", "ds_configs/zero2_fp16.json", compile_layers=True)
    assert len(lines) == 2
    assert lines[1] == ("torch.compile on sm_70: fp16 graphs; Triton has no tensor-core path before sm_80, so the "
                        "matmuls stay cuBLAS and compilation fuses only the element-wise work")
    mock_gpu(*A100)
    assert len(check_device("cuda", "bf16", "cfg.json", compile_layers=True)) == 1  # no note on sm_80+


def test_turing_t4_has_no_bf16_either(mock_gpu):
    mock_gpu("Tesla T4", (7, 5))
    with pytest.raises(ConfigError, match="Tesla T4 is sm_75; use an fp16 config"):
        check_device("cuda", "bf16", "cfg.json")


def test_cpu_accelerator_checks_nothing_and_touches_no_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("queried CUDA on a CPU run")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    assert check_device("cpu", "bf16", "cfg.json") == []


def test_bad_capability_is_a_config_error():
    with pytest.raises(ConfigError, match="compute capability must be"):
        GpuInfo("x", (7,))
    assert check_gpu(GpuInfo("x", (9, 0)), "bf16", "c.json")[0].endswith("SDPA flash kernel in bf16")


def test_every_shipped_ds_config_on_a_v100(mock_gpu):
    """The trainer's start-up call (check_device with precision_of the merged config) over ds_configs/: every
    bf16 config (bf16 mode or bf16 autocast) is refused on a V100, every fp16 and fp32 one runs."""
    import json

    from pipeline.training.config import precision_of

    mock_gpu(*V100)
    seen = set()
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        if "zero_optimization" not in config:
            continue  # a recipe, not a DeepSpeed config
        precision = precision_of(config)
        seen.add(precision)
        if precision.startswith("bf16"):
            with pytest.raises(ConfigError, match="use an fp16 config instead"):
                check_device("cuda", precision, str(path))
        else:
            assert "SDPA memory-efficient kernel" in check_device("cuda", precision, str(path))[0], path
    assert {"bf16", "bf16-autocast", "fp16", "fp32"} <= seen
