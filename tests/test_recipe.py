"""Recipe parsing: every shipped recipe validates; every mistake is reported at once."""

from __future__ import annotations

import pytest
import yaml

from lowvram.errors import UserError
from lowvram.plan.hardware import Device, known_card, simulated_device
from lowvram.plan.planner import make_plan
from lowvram.recipe import (
    Recipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    shipped_recipes,
)

CPU = Device("cpu", "CPU", 0, 0, None, "none")


def test_at_least_the_promised_recipes_ship():
    names = set(shipped_recipes())
    assert {"demo", "tiny", "chat-assistant", "concise", "orpo-tight"} <= names


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates_online_and_offline(name):
    recipe, _ = load_recipe(name)
    assert recipe.name == name and recipe.description
    offline, _ = load_recipe(name, ["use_samples=true"])
    assert offline.use_samples
    for stage in offline.stages():
        if stage == "dpo" and offline.pairs.enabled:
            continue  # its pairs are sampled from the policy (lowvram/pairs/build.py)
        data = getattr(offline, stage).data
        assert data.sample, f"{name}.{stage} has no offline sample"
        if name not in ("demo", "tiny"):  # their shipped data is all they train on
            assert data.path and "/" in data.path, f"{name}.{stage} names no public dataset"


def test_demo_plans_on_cpu_with_hf_backend():
    recipe, _ = load_recipe("tiny")
    plan = make_plan(recipe, CPU)
    assert (plan.tier, plan.backend, plan.dtype, plan.load_in_4bit) == ("cpu", "hf", "fp32", False)


def test_all_mistakes_are_listed_at_once():
    data = {
        "model": {"famliy": "llama", "tier": "20gb"},
        "sft": {"max_seq_len": 0, "learning_rate": -1.0, "data": {"path": "x.jsonl"}, "packing": "yes"},
        "dpo": {"beta": "high", "loss_type": "sigmod", "data": {"path": "y.jsonl"}},
        "export": {"gguf": ["q4_k_m", "q3"]},
    }
    with pytest.raises(UserError) as e:
        parse_recipe(data, "bad.yaml")
    problems = "\n".join(e.value.problems)
    assert len(e.value.problems) == 8, problems
    assert "model.famliy: unknown key (did you mean 'model.family'?)" in problems
    assert "model.tier: '20gb' is not a tier" in problems
    assert "sft.max_seq_len: must be >= 16, got 0" in problems
    assert "sft.learning_rate: must be > 0, got -1" in problems
    assert "sft.packing: expected true or false, got 'yes'" in problems
    assert "dpo.beta: expected a number, got 'high'" in problems
    assert "dpo.loss_type: 'sigmod' is not one of" in problems and "did you mean 'sigmoid'" in problems
    assert "export.gguf: 'q3' is not one of" in problems
    assert "bad.yaml: 8 problems" in e.value.message


def test_export_type_typo_is_reported_with_choices():
    with pytest.raises(UserError) as e:
        parse_recipe({"sft": {"data": {"path": "a"}}, "dpo": {"data": {"path": "b"}}, "export": {"gguf": "q4km"}})
    assert "export.gguf: 'q4km' is not one of" in e.value.problems[0]


def test_nothing_to_train_and_missing_data_are_errors():
    with pytest.raises(UserError) as e:
        parse_recipe({"sft": {"enabled": False}, "dpo": {"enabled": False}})
    assert any("nothing to train" in p for p in e.value.problems)
    with pytest.raises(UserError) as e:
        parse_recipe({"dpo": {"enabled": False}})
    assert any(p.startswith("sft.data.path: empty") for p in e.value.problems)


def test_dotted_overrides_set_nested_values_with_yaml_types():
    data = apply_overrides(
        {"dpo": {"beta": 0.1}},
        ["dpo.beta=0.2", "sft.packing=true", "export.gguf=[q8_0, f16]", "model.name=builtin:tiny-llama"],
    )
    assert data["dpo"]["beta"] == 0.2 and data["sft"]["packing"] is True
    assert data["export"]["gguf"] == ["q8_0", "f16"] and data["model"]["name"] == "builtin:tiny-llama"
    recipe, _ = load_recipe("chat-assistant", ["dpo.beta=0.2", "lora.r=8"])
    assert recipe.dpo.beta == 0.2 and recipe.lora.r == 8


def test_exponent_without_dot_is_a_number():
    recipe, _ = load_recipe("tiny", ["sft.learning_rate=5e-3"])
    assert recipe.sft.learning_rate == 0.005


def test_bad_override_syntax():
    with pytest.raises(UserError) as e:
        apply_overrides({"dpo": {"beta": 0.1}}, ["dpo.beta", "dpo.beta.x=1"])
    assert len(e.value.problems) == 2


def test_unknown_recipe_suggests_a_close_name():
    with pytest.raises(UserError) as e:
        load_recipe("chat-asistant")
    assert "Did you mean 'chat-assistant'" in e.value.message and "lowvram recipes" in e.value.hint


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  epochs: 1\n   learning_rate: 2\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(bad))
    assert "not valid YAML at line 3" in e.value.message


def test_non_mapping_recipe(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_recipe(str(bad))


def test_resolved_recipe_round_trips_through_yaml():
    recipe, _ = load_recipe("tiny")
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe and isinstance(again, Recipe)


def test_family_a_tier_does_not_offer_is_refused_with_advice():
    # The cpu tier names its models (no budget to compute them from): no mistral there.
    recipe, _ = load_recipe("concise", ["model.family=mistral"])
    with pytest.raises(UserError) as e:
        make_plan(recipe, CPU)
    assert "cpu tier has no mistral model" in e.value.message and "qwen" in e.value.hint


def test_4bit_model_on_cpu_points_to_the_16bit_original():
    recipe, _ = load_recipe("chat-assistant", ["model.name=unsloth/Llama-3.2-3B-Instruct-bnb-4bit"])
    with pytest.raises(UserError) as e:
        make_plan(recipe, CPU)
    assert "model.name=unsloth/Llama-3.2-3B-Instruct" in e.value.hint


def test_unsloth_backend_refused_without_cuda():
    recipe, _ = load_recipe("tiny", ["model.backend=unsloth"])
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        make_plan(recipe, CPU)


def test_t4_plan_is_fp16_and_16gb():
    recipe, _ = load_recipe("chat-assistant")
    plan = make_plan(recipe, known_card("t4"))
    assert plan.tier == "16gb" and plan.dtype == "fp16"
    assert plan.stages["dpo"].max_seq_len <= plan.stages["sft"].max_seq_len


def test_recipe_values_beat_tier_defaults():
    recipe, _ = load_recipe("chat-assistant", ["sft.max_seq_len=512", "sft.batch_size=4"])
    plan = make_plan(recipe, simulated_device(24))
    assert plan.stages["sft"].max_seq_len == 512 and plan.stages["sft"].batch_size == 4
    assert plan.stages["sft"].reasons["max_seq_len"] == "set by the recipe"


def test_kto_at_batch_one_is_refused_with_the_fix():
    with pytest.raises(UserError) as err:
        load_recipe("chat-assistant", ["dpo.method=kto", "dpo.batch_size=1"])
    assert "dpo.batch_size: KTO needs at least 2" in err.value.render() and "dpo.batch_size=2" in err.value.render()
    load_recipe("chat-assistant", ["dpo.method=kto", "dpo.batch_size=2"])
    load_recipe("chat-assistant", ["dpo.batch_size=1"])  # DPO itself is fine at 1
