"""Tier selection for real cards, from simulated device properties."""

from __future__ import annotations

import pytest

from lowvram.errors import UserError
from lowvram.plan.hardware import Device, detect_device, known_card, simulated_device
from lowvram.plan.tiers import TIERS, select_tier

# (name, total GiB as the driver reports it, compute capability, expected tier, expected dtype)
CARDS = [
    ("NVIDIA GeForce RTX 4090", 23.99, (8, 9), "24gb", "bf16"),
    ("NVIDIA GeForce RTX 3090", 24.0, (8, 6), "24gb", "bf16"),
    ("NVIDIA A10G", 22.49, (8, 6), "24gb", "bf16"),
    ("NVIDIA GeForce RTX 4080", 15.99, (8, 9), "16gb", "bf16"),
    ("NVIDIA GeForce RTX 4060 Ti", 15.99, (8, 9), "16gb", "bf16"),
    ("Tesla T4", 15.0, (7, 5), "16gb", "fp16"),
    ("Tesla T4 (torch's view)", 14.74, (7, 5), "16gb", "fp16"),
    ("NVIDIA GeForce RTX 3060", 11.76, (8, 6), "12gb", "bf16"),
    ("NVIDIA GeForce RTX 4070", 11.99, (8, 9), "12gb", "bf16"),
    ("NVIDIA GeForce RTX 2080 Ti", 10.75, (7, 5), "12gb", "fp16"),
    ("NVIDIA GeForce RTX 3080", 10.0, (8, 6), "8gb", "bf16"),
    ("NVIDIA GeForce RTX 3070", 7.79, (8, 6), "8gb", "bf16"),
    ("NVIDIA GeForce RTX 4060", 7.75, (8, 9), "8gb", "bf16"),
    ("NVIDIA H100 80GB HBM3", 79.6, (9, 0), "24gb", "bf16"),
]


@pytest.mark.parametrize("name,total,cc,tier,dtype", CARDS, ids=[c[0] for c in CARDS])
def test_tier_for_real_cards(name, total, cc, tier, dtype):
    dev = Device("cuda", name, total, total - 0.3, cc, "nvidia-smi")
    chosen, reason = select_tier(dev)
    assert chosen.name == tier
    assert name in reason and tier in reason
    assert dev.dtype_choice()[0] == dtype


def test_t4_reason_says_why_fp16():
    dtype, reason = known_card("T4").dtype_choice()
    assert dtype == "fp16" and "7.5" in reason and "no bf16" in reason


def test_card_below_smallest_tier_is_refused_with_advice():
    dev = Device("cuda", "NVIDIA GeForce GTX 1650", 3.8, 3.6, (7, 5), "nvidia-smi")
    with pytest.raises(UserError) as e:
        select_tier(dev)
    assert "3.8 GiB" in e.value.message and "CPU" in e.value.hint


def test_cpu_and_apple_get_the_cpu_tier():
    for dev in (Device("cpu", "CPU", 0, 0, None, "none"), Device("mps", "Apple GPU (MPS)", 0, 0, None, "platform")):
        tier, reason = select_tier(dev)
        assert tier.name == "cpu" and "4-bit" in reason
        assert dev.dtype_choice()[0] == "fp32"


def test_vram_flag_and_env_var_plan_for_a_card_we_do_not_have(monkeypatch):
    assert detect_device(vram_gib="12").total_vram_gib == 12
    assert select_tier(detect_device(vram_gib=16))[0].name == "16gb"
    monkeypatch.setenv("LOWVRAM_VRAM_GIB", "24")
    dev = detect_device()
    assert dev.simulated and select_tier(dev)[0].name == "24gb"
    monkeypatch.delenv("LOWVRAM_VRAM_GIB")
    monkeypatch.setenv("LOWVRAM_GPU", "t4")
    assert detect_device().name == "Tesla T4"


@pytest.mark.parametrize("bad", ["0", "-3", "lots"])
def test_bad_vram_values_are_user_errors(bad):
    with pytest.raises(UserError):
        detect_device(vram_gib=bad)


def test_unknown_card_lists_known_ones():
    with pytest.raises(UserError) as e:
        known_card("rtx9999")
    assert "t4" in e.value.hint


def test_explicit_tier_and_unknown_tier():
    dev = simulated_device(24)
    assert select_tier(dev, "12gb")[0].name == "12gb"
    with pytest.raises(UserError, match="Unknown tier"):
        select_tier(dev, "20gb")


def test_every_gpu_tier_offers_models_and_sane_settings():
    for tier in TIERS.values():
        assert tier.models, tier.name
        assert tier.dpo_max_seq_len <= tier.sft_max_seq_len
        assert tier.lora_r > 0 and tier.batch_size > 0 and tier.grad_accum > 0
    gpu = [t for t in TIERS.values() if t.name != "cpu"]
    assert [t.min_total_gib for t in gpu] == sorted((t.min_total_gib for t in gpu), reverse=True)
