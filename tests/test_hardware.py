import re

import pytest

from newllm_nb.runtime.hardware import HardwareInfo, classify, detect, original_table, recommend


@pytest.mark.parametrize("name,kind", [("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA A100-SXM4-40GB", "A100"),
                                       ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                       ("NVIDIA GeForce RTX 4090", "other")])
def test_classify_gpu_names(name, kind):
    assert classify(name) == kind


def _gpu(kind, mem=40.0, bf16=True):
    return HardwareInfo(kind, kind, "cuda:0", mem, "8.0", bf16)


def test_recommendations_follow_the_original_table_and_lr_rule():
    assert (recommend(_gpu("T4", 15, False)).batch_size, recommend(_gpu("T4", 15, False)).precision) == (512, "fp16")
    l4 = recommend(_gpu("L4", 22))
    assert (l4.batch_size, round(l4.lr, 6), l4.precision) == (2048, 8e-4, "bf16")
    assert recommend(_gpu("A100")).batch_size == 4096 and recommend(_gpu("H100", 80)).batch_size == 4096
    assert recommend(_gpu("other", 12)).batch_size == 512
    cpu = recommend(detect("cpu"))
    assert cpu.precision == "fp32" and cpu.lr == pytest.approx(1e-4 * (cpu.batch_size / 32) ** 0.5)
    assert [r["gpu"] for r in original_table()] == ["T4", "L4", "A100"]


def test_the_documented_batches_are_the_recommended_ones():
    """recommend's docstring names the batch for the CPU and for H100 / H200; the code must give exactly those
    (a docstring that said CPU 256 while the code set 64 fails here)."""
    doc = " ".join(recommend.__doc__.split())
    cpu = re.search(r"CPU (\d+)", doc)
    gpus = re.search(r"H100/H200 (\d+)", doc)
    assert cpu and gpus, doc
    assert recommend(HardwareInfo("CPU", "CPU", "cpu", 8.0, None, False)).batch_size == int(cpu.group(1))
    assert recommend(detect("cpu")).batch_size == int(cpu.group(1))
    for kind in ("H100", "H200"):
        assert recommend(_gpu(kind, 80)).batch_size == int(gpus.group(1))
