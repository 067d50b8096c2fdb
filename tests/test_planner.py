"""The planner: settings from the memory estimate, never over budget, refusals that name what fits."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.cli import main
from lowvram.errors import UserError
from lowvram.plan.catalog import CATALOG, get_spec
from lowvram.plan.hardware import KNOWN_CARDS, Device, known_card, simulated_device
from lowvram.plan.memory import estimate
from lowvram.plan.planner import SAFETY_MARGIN_FRACTION, SEQ_LADDER, make_plan, tier_table
from lowvram.plan.tiers import TIERS
from lowvram.recipe import load_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parent.parent
CPU = Device("cpu", "CPU", 0, 0, None, "none")


def reestimate(plan, stage: str, max_seq_len: int | None = None, batch_size: int | None = None, method: str = "dpo"):
    """The estimate of a planned stage, recomputed from the plan's own fields."""
    sp = plan.stages[stage]
    est_stage = "orpo" if stage == "dpo" and method == "orpo" else stage
    return estimate(
        get_spec(plan.model),
        est_stage,
        max_seq_len=max_seq_len or sp.max_seq_len,
        batch_size=batch_size or sp.batch_size,
        lora_r=plan.lora_r,
        grad_ckpt=sp.grad_ckpt,
        optim=sp.optim,
        dtype=plan.dtype,
        backend=plan.backend,
        load_in_4bit=plan.load_in_4bit,
        vram_gib=plan.device.usable_vram_gib,
    )


@pytest.mark.parametrize("card", sorted(KNOWN_CARDS))
@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_plan_within_budget_on_every_card(name, card):
    recipe, _ = load_recipe(name)
    device = known_card(card)
    plan = make_plan(recipe, device)
    assert plan.stages and all(plan.reasons.values())
    for stage, sp in plan.stages.items():
        assert sp.budget_gib == pytest.approx(device.usable_vram_gib * (1 - SAFETY_MARGIN_FRACTION), abs=1e-3)
        assert sp.estimate is not None and sp.fits
        assert sp.estimate.total_gib <= sp.budget_gib
        assert reestimate(plan, stage, method=recipe.dpo.method).total_gib == pytest.approx(sp.estimate.total_gib)
        assert all(sp.reasons[k] for k in ("max_seq_len", "batch_size", "grad_accum", "grad_ckpt", "optim"))


@pytest.mark.parametrize("vram", [5.6, 6.5, 8, 10, 11, 12, 14, 15, 16, 20, 24, 40, 80])
@pytest.mark.parametrize("family", ["llama", "qwen", "mistral"])
def test_planner_never_returns_settings_over_budget(vram, family):
    recipe, _ = load_recipe("chat-assistant", [f"model.family={family}"])
    try:
        plan = make_plan(recipe, simulated_device(vram))
    except UserError as e:  # a family the tier does not offer, or nothing fits: refused, never over budget
        assert "tier has no" in e.message or "does not fit" in e.message
        return
    for sp in plan.stages.values():
        assert sp.estimate.total_gib <= sp.budget_gib


@pytest.mark.parametrize("card", ["rtx4090", "t4", "rtx3060", "rtx4060"])
def test_chosen_settings_are_the_largest_that_fit(card):
    recipe, _ = load_recipe("chat-assistant")
    plan = make_plan(recipe, known_card(card))
    tier = TIERS[plan.tier]
    for stage, sp in plan.stages.items():
        target_seq = tier.dpo_max_seq_len if stage == "dpo" else tier.sft_max_seq_len
        target_eff = tier.dpo_batch_size * tier.dpo_grad_accum if stage == "dpo" else tier.batch_size * tier.grad_accum
        longer = [s for s in SEQ_LADDER if sp.max_seq_len < s <= target_seq]
        if longer:  # the next ladder step up would not have fit, even at batch 1
            assert reestimate(plan, stage, max_seq_len=min(longer), batch_size=1).total_gib > sp.budget_gib
        if 2 * sp.batch_size <= target_eff:
            assert reestimate(plan, stage, batch_size=2 * sp.batch_size).total_gib > sp.budget_gib
        assert sp.effective_batch == target_eff  # gradient accumulation keeps the effective batch


def test_smaller_card_gets_shorter_or_smaller_settings_for_the_same_model():
    recipe, _ = load_recipe(
        "chat-assistant", ["model.name=unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "model.tier=24gb"]
    )
    big, small = make_plan(recipe, simulated_device(24)), make_plan(recipe, simulated_device(12))
    for stage in big.stages:
        b, s = big.stages[stage], small.stages[stage]
        assert s.max_seq_len * s.batch_size < b.max_seq_len * b.batch_size
        assert s.effective_batch == b.effective_batch


def test_too_large_model_is_refused_with_what_would_fit():
    recipe, _ = load_recipe("chat-assistant", ["model.name=unsloth/Qwen2.5-14B-Instruct-bnb-4bit"])
    with pytest.raises(UserError) as e:
        make_plan(recipe, known_card("rtx4060"))
    err = e.value
    assert "does not fit on NVIDIA GeForce RTX 4060" in err.message and "budget is 7.2 GiB" in err.message
    suggestion = next(p for p in err.problems if "a smaller qwen model" in p)
    override = suggestion.split(": ", 1)[1].split(" fits")[0]  # model.name=...
    fixed, _ = load_recipe("chat-assistant", [override])
    assert make_plan(fixed, known_card("rtx4060")).model == override.split("=", 1)[1]


def test_forced_bigger_tier_on_a_small_card_gets_a_model_that_fits_this_card():
    # The 24 GB tier's targets on an 8 GB card: the model is the largest the estimator fits here.
    recipe, _ = load_recipe("concise", ["model.tier=24gb"])
    plan = make_plan(recipe, known_card("rtx4060"))
    assert plan.tier == "24gb" and all(sp.fits for sp in plan.stages.values())
    assert get_spec(plan.model).params_b < 8 and "largest" in plan.reasons["model"]


@pytest.mark.parametrize("vram,tier", [(12, "12gb"), (16, "16gb"), (24, "24gb")])
@pytest.mark.parametrize("family", ["llama", "qwen", "mistral", "gemma", "phi"])
def test_default_model_is_the_largest_of_its_family_the_estimator_fits(vram, tier, family):
    recipe, _ = load_recipe("chat-assistant", [f"model.family={family}"])
    device = simulated_device(vram)
    t = TIERS[tier]
    budget = vram * (1 - SAFETY_MARGIN_FRACTION)
    try:
        plan = make_plan(recipe, device)
    except UserError as e:  # no member of the family fits this card at the tier's targets
        assert "does not fit" in e.message
        return
    chosen = get_spec(plan.model)
    assert plan.tier == tier and chosen.family == family
    targets = {"sft": t.sft_max_seq_len, "dpo": t.dpo_max_seq_len}
    r = t.lora_r

    def fits(spec):
        return all(
            estimate(spec, st, max_seq_len=seq, batch_size=1, lora_r=r, vram_gib=vram, dtype=plan.dtype).total_gib
            <= budget
            for st, seq in targets.items()
        )

    assert fits(chosen)
    larger = [
        s for s in CATALOG.values() if s.family == family and s.prequantized_4bit and s.params_b > chosen.params_b
    ]
    assert not any(fits(s) for s in larger), [s.name for s in larger if fits(s)]


def test_12gb_chat_plan_gets_an_8b_class_model_and_24gb_more_than_8b():
    recipe, _ = load_recipe("chat-assistant")
    assert get_spec(make_plan(recipe, known_card("rtx3060")).model).params_b >= 7
    qwen, _ = load_recipe("chat-assistant", ["model.family=qwen"])
    assert get_spec(make_plan(qwen, known_card("rtx4090")).model).params_b > 8


@pytest.mark.parametrize(
    "card,override,effective",
    [("rtx4090", "sft.batch_size=1", 8), ("rtx3060", "sft.batch_size=2", 8), ("rtx4090", "dpo.batch_size=1", 8)],
)
def test_setting_batch_size_keeps_the_tiers_effective_batch(card, override, effective):
    recipe, _ = load_recipe("chat-assistant", [override])
    plan = make_plan(recipe, known_card(card))
    stage = override.split(".")[0]
    sp = plan.stages[stage]
    assert sp.batch_size == int(override.split("=")[1])
    assert sp.effective_batch == effective, plan.lines()
    both, _ = load_recipe("chat-assistant", [override, f"{stage}.grad_accum=3"])
    assert make_plan(both, known_card(card)).stages[stage].effective_batch == int(override.split("=")[1]) * 3


def test_refusal_suggests_the_longest_sequence_that_fits_computed_for_the_card():
    recipe, _ = load_recipe(
        "chat-assistant",
        ["model.name=unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "sft.max_seq_len=131072", "lora.r=32"],
    )
    device = simulated_device(24)
    with pytest.raises(UserError) as e:
        make_plan(recipe, device)
    need, budget = e.value.message.split("needs about ")[1].split(" GiB")[0], e.value.message.split("budget is ")[1]
    assert need != budget.split(" GiB")[0]  # a need over the budget never prints as equal to it
    idea = next(p for p in e.value.problems if p.startswith("sft.max_seq_len="))
    seq = int(idea.split("=")[1].split()[0])
    assert seq > 8192 and seq not in SEQ_LADDER  # computed, not the next entry of a fixed list
    fixed, _ = load_recipe(
        "chat-assistant",
        ["model.name=unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", f"sft.max_seq_len={seq}", "lora.r=32"],
    )
    assert make_plan(fixed, device).stages["sft"].fits
    over, _ = load_recipe(
        "chat-assistant",
        ["model.name=unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", f"sft.max_seq_len={seq + 64}", "lora.r=32"],
    )
    with pytest.raises(UserError):
        make_plan(over, device)


@pytest.mark.parametrize("vram", ["inf", "nan", "-inf", "1e400", "0", "-3"])
def test_non_finite_or_non_positive_vram_is_refused(vram, capsys):
    assert main(["plan", "chat-assistant", f"--vram={vram}", "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "--vram must be a positive, finite number" in out.err


@pytest.mark.parametrize("args", [["--vram", "12"], ["--vram", "5000"], ["--gpu", "t4"], ["--vram", "0.5"]])
def test_plan_json_is_strict_json_or_a_clear_error(args, capsys):
    code = main(["plan", "chat-assistant", *args, "--json"])
    out = capsys.readouterr()
    if code == 0:

        def refuse(const):
            raise ValueError(f"not strict JSON: {const}")

        json.loads(out.out, parse_constant=refuse)
    else:
        assert code == 2 and out.out == "" and out.err


def test_recipe_values_win_but_over_budget_ones_are_refused_with_values_that_fit():
    recipe, _ = load_recipe("chat-assistant", ["sft.max_seq_len=512", "sft.batch_size=2"])
    plan = make_plan(recipe, known_card("t4"))
    assert (plan.stages["sft"].max_seq_len, plan.stages["sft"].batch_size) == (512, 2)
    assert plan.stages["sft"].reasons["max_seq_len"] == "set by the recipe"

    recipe, _ = load_recipe("chat-assistant", ["sft.max_seq_len=8192", "sft.batch_size=4"])
    with pytest.raises(UserError) as e:
        make_plan(recipe, known_card("t4"))
    assert "sft.max_seq_len=8192 with sft.batch_size=4 needs about" in e.value.message
    for idea in e.value.problems:  # every suggestion, applied, plans within budget
        setting = idea.split(" fits")[0]
        keep = "sft.max_seq_len=8192" if "batch_size" in setting else "sft.batch_size=4"
        fixed, _ = load_recipe("chat-assistant", [keep, setting])
        assert make_plan(fixed, known_card("t4")).stages["sft"].fits


def test_cpu_keeps_tier_defaults_without_a_budget():
    recipe, _ = load_recipe("chat-assistant", ["model.name=unsloth/Qwen2.5-0.5B-Instruct"])
    plan = make_plan(recipe, CPU)
    cpu = TIERS["cpu"]
    sft = plan.stages["sft"]
    assert (sft.max_seq_len, sft.batch_size, sft.grad_accum) == (cpu.sft_max_seq_len, cpu.batch_size, cpu.grad_accum)
    assert sft.estimate is None and sft.budget_gib is None and sft.fits is None
    assert "no VRAM budget" in plan.reasons["memory"]
    assert any("not estimated" in line for line in plan.lines())


def test_tier_table_is_planner_output_that_fits():
    rows = tier_table()
    assert {r["tier"] for r in rows} == {"24gb", "16gb", "12gb", "8gb"}
    for r in rows:
        assert r["estimate_gib"] <= r["budget_gib"]
    by_key = {(r["tier"], r["family"], r["stage"]): r for r in rows}
    for (tier, family, stage), r in by_key.items():
        if stage == "dpo":
            assert r["max_seq_len"] <= by_key[(tier, family, "sft")]["max_seq_len"]


def test_plan_command_prints_the_memory_table_and_json(capsys):
    assert main(["plan", "chat-assistant", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "weights",
        "LoRA+optimizer",
        "activations",
        "logits",
        "ref forward",
        "overhead",
        "total",
        "budget",
        "sft (seq",
        "dpo (seq",
        "minus a 10% safety margin",
    ):
        assert needle in out
    assert main(["plan", "chat-assistant", "--gpu", "t4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    dpo = data["stages"]["dpo"]
    assert dpo["fits"] is True and dpo["estimate"]["ref_forward_gib"] > 0
    assert dpo["estimate"]["total_gib"] <= dpo["budget_gib"]


def test_refusal_exits_2_without_traceback():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowvram",
            "plan",
            "chat-assistant",
            "--gpu",
            "rtx4060",
            "model.name=unsloth/Qwen2.5-14B-Instruct-bnb-4bit",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert "does not fit" in res.stderr and "model.name=" in res.stderr and "Traceback" not in res.stderr


def _calibration_module():
    spec = importlib.util.spec_from_file_location("calibrate_vram", ROOT / "scripts" / "calibrate_vram.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_calibration_points_are_within_bound_and_beat_unsloth():
    cal_mod = _calibration_module()
    cal = cal_mod.calibrate()
    assert len(cal.results) >= 4 and cal.ok
    for r in cal.results:
        if r.full_length:
            assert abs(r.lowvram_error) <= cal_mod.ERROR_BOUND, r.point.label
        assert r.lowvram_error >= -cal_mod.ERROR_BOUND, r.point.label
    # A chat dataset that fills 2 x 2048 tokens (Llama-3.2-3B, 6.53 GiB measured): an upper bound.
    chat = next(r for r in cal.results if r.point.label == "Llama-3.2-3B")
    assert chat.full_length and chat.lowvram_gib >= chat.point.measured_gib
    assert cal.lowvram_mae < cal.unsloth_mae
    assert all(p.why_not for p in cal.skipped)
    # Max context against Unsloth's published table: 0.8x to 1x where it is checked, never above.
    ratios = {gb: ours / pub for gb, ours, pub in cal.context}
    assert all(0.8 <= ratios[gb] <= 1 for gb in (12, 16, 24, 40, 80)), ratios
    assert all(r <= 1 for r in ratios.values()), ratios


def test_lowvram_own_gpu_peaks_are_met_from_above_within_a_few_percent():
    # lowvram's pipeline on an H100 (scripts/data/README.md): the Unsloth backend's SFT and DPO peaks.
    # The estimate may sit a little under a peak (the planner keeps a 10% margin), never far under,
    # and within the +-20% bound above (DPO was +22% to +105% before TRL's fused LM head was modelled).
    cal_mod = _calibration_module()
    cal = cal_mod.calibrate()
    rows = [
        r
        for r in cal.results
        if r.point.stack.startswith("lowvram backend=unsloth") and r.point.setup.stage in ("sft", "dpo")
    ]
    assert {r.point.setup.stage for r in rows} == {"sft", "dpo"} and len(rows) >= 10
    for r in rows:
        assert -0.05 <= r.lowvram_error <= cal_mod.ERROR_BOUND, (r.point.label, r.point.setup, r.lowvram_error)
    hf = [r for r in cal.results if r.point.stack.startswith("lowvram backend=hf")]
    assert hf and all(r.lowvram_error >= 0 for r in hf)


def test_calibration_check_fails_when_a_point_is_off(tmp_path, capsys):
    cal_mod = _calibration_module()
    lines = cal_mod.DATA.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    peak = header.index("peak_gib")
    rows[0][peak] = f"{float(rows[0][peak]) * 1.5:.2f}"  # as if the first row had measured 50% more
    bad = tmp_path / "points.csv"
    bad.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    assert cal_mod.main(["--csv", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("card", sorted(KNOWN_CARDS))
def test_kto_is_never_planned_below_two_per_device(card):
    """TRL's KTOTrainer raises at a per-device batch of 1; DPO on the same card may be planned at 1."""
    recipe, _ = load_recipe("chat-assistant", ["dpo.method=kto"])
    try:
        sp = make_plan(recipe, known_card(card)).stages["dpo"]
    except UserError:
        return  # nothing fits this card at all: refused before anything loads
    assert sp.batch_size >= 2, sp.reasons
    assert sp.fits in (None, True)


def test_kto_batch_is_raised_to_two_with_its_reason_and_a_sequence_that_fits():
    dpo_recipe, _ = load_recipe("chat-assistant")
    kto_recipe, _ = load_recipe("chat-assistant", ["dpo.method=kto"])

    def dpo_batch(card) -> int | None:
        try:
            return make_plan(dpo_recipe, card).stages["dpo"].batch_size
        except UserError:
            return None

    # the case that matters: a card where the memory plan alone gives DPO batch 1 (8B just fits)
    card = next(c for c in (simulated_device(g / 10) for g in range(60, 240, 2)) if dpo_batch(c) == 1)
    dpo = make_plan(dpo_recipe, card).stages["dpo"]
    kto = make_plan(kto_recipe, card).stages["dpo"]
    assert kto.batch_size == 2 and "KTO needs at least 2 per device" in kto.reasons["batch_size"]
    assert kto.effective_batch >= dpo.effective_batch and kto.fits
    assert kto.max_seq_len <= dpo.max_seq_len
    unknown, _ = load_recipe("chat-assistant", ["dpo.method=kto", "model.name=someorg/not-in-the-catalog-7b"])
    assert make_plan(unknown, known_card("t4")).stages["dpo"].batch_size == 2  # tier default 1, no budget
