"""The streaming merge: safetensors format, PEFT's LoRA semantics, 4-bit bases, adapter mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowvram.errors import UserError
from lowvram.export.merge import BaseChoice, _bnb_state, _dequantize_4bit, choose_base, merge_lora, read_adapter
from lowvram.utils.safetensors_io import SafetensorsWriter, read_safetensors_header, read_tensor

BNB_FIXTURE = Path(__file__).parent / "data" / "bnb4bit.safetensors"  # scripts/make_bnb_fixture.py


def test_writer_output_is_read_by_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4).bfloat16(),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(
        path,
        [
            (k, {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}[v.dtype], tuple(v.shape))
            for k, v in tensors.items()
        ],
        {"format": "pt"},
    ) as w:
        for k, v in tensors.items():
            w.write(k, v)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    entries, meta = read_safetensors_header(path)
    assert meta == {"format": "pt"} and torch.equal(read_tensor(entries["c"]), tensors["c"])


def test_dequantize_4bit_equals_bitsandbytes():
    """NF4 and FP4, with and without double quantization, bit for bit against bitsandbytes' own output."""
    entries, meta = read_safetensors_header(BNB_FIXTURE)
    names = [n for n in entries if n.endswith(".weight")]
    assert len(names) == 4 and meta["bitsandbytes"]
    for name in names:
        state = _bnb_state(entries, name)
        got = _dequantize_4bit(entries, name, state).to(torch.bfloat16)
        assert torch.equal(got, read_tensor(entries[name + ".reference"])), name


def _write_adapter(path: Path, weights: dict[str, torch.Tensor], r: int, alpha: int, **cfg) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, **cfg}))
    return path


def _four_bit_checkpoint(tmp_path: Path) -> Path:
    """A 4-bit checkpoint as transformers saves one: packed weight + bitsandbytes companions, config with
    quantization_config. Its one linear is the fixture's NF4 double-quantized tensor."""
    from safetensors.torch import save_file

    entries, _ = read_safetensors_header(BNB_FIXTURE)
    src = "nf4_nested.weight"
    target = "model.layers.0.mlp.down_proj.weight"
    tensors = {
        target + k.removeprefix(src): read_tensor(e).clone()
        for k, e in entries.items()
        if k.startswith(src) and not k.endswith(".reference")
    }
    tensors["model.norm.weight"] = torch.ones(96)
    out = tmp_path / "base-4bit"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "torch_dtype": "bfloat16",
                "quantization_config": {"load_in_4bit": True, "quant_method": "bitsandbytes"},
            }
        )
    )
    return out


def test_merge_into_a_4bit_base_dequantizes_then_adds_the_delta(tmp_path):
    base = _four_bit_checkpoint(tmp_path)
    (tmp_path / "base.json").write_text(
        json.dumps(
            {
                "model": "org/model-bnb-4bit",
                "model_path": str(base),
                "base_16bit": "org/model-not-downloaded",
                "load_in_4bit": True,
            }
        )
    )
    choice = choose_base(tmp_path / "base.json")
    assert choice.quantized_4bit and choice.path == base and "dequantizing the 4-bit base" in choice.reason
    assert "is not downloaded" in choice.reason

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 128, generator=gen), torch.randn(96, 4, generator=gen)
    adapter = read_adapter(
        _write_adapter(
            tmp_path / "adapter",
            {
                "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": a,
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": b,
            },
            r=4,
            alpha=8,
        )
    )
    report = merge_lora(choice, adapter, tmp_path / "merged")
    assert report.merged == 1 and report.dtype == "bf16"

    entries, _ = read_safetensors_header(tmp_path / "merged" / "model.safetensors")
    assert set(entries) == {"model.layers.0.mlp.down_proj.weight", "model.norm.weight"}  # companions folded in
    ref = read_tensor(read_safetensors_header(BNB_FIXTURE)[0]["nf4_nested.weight.reference"]).float()
    want = (ref + 2.0 * b @ a).bfloat16()
    assert torch.equal(read_tensor(entries["model.layers.0.mlp.down_proj.weight"]), want)
    assert entries["model.norm.weight"].dtype == "BF16"
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_choose_base_prefers_the_local_16bit_original(tmp_path, tiny_init_model_dir):
    base4 = _four_bit_checkpoint(tmp_path)
    (tmp_path / "base.json").write_text(
        json.dumps(
            {
                "model": "x-bnb-4bit",
                "model_path": str(base4),
                "base_16bit": str(tiny_init_model_dir),
                "load_in_4bit": True,
            }
        )
    )
    choice = choose_base(tmp_path / "base.json")
    assert choice.path == tiny_init_model_dir and not choice.quantized_4bit and "16-bit original" in choice.reason


def test_base_not_on_this_machine(tmp_path):
    (tmp_path / "base.json").write_text(
        json.dumps({"model": "org/never-downloaded", "model_path": None, "base_16bit": None, "load_in_4bit": True})
    )
    with pytest.raises(UserError, match="not on this machine"):
        choose_base(tmp_path / "base.json")


def test_peft_semantics_rank_alpha_patterns_rslora_embeddings_modules_to_save(tmp_path, tiny_init_model_dir):
    """Per-module rank and alpha, rsLoRA scaling, a LoRA on the embedding and a fully trained lm_head
    all merge to what PEFT's own merge_and_unload gives."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_init_model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"q_proj": 32},
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ref = peft_model.merge_and_unload().state_dict()

    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.pairs["model.layers.0.self_attn.v_proj.weight"].a.shape[0] == 4
    assert adapter.pairs["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(32 / 8**0.5)
    merge_lora(BaseChoice(tiny_init_model_dir, False, "test"), adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v.bfloat16().float(), rtol=0, atol=float(v.abs().max()) * 2**-7, msg=k)


def test_corrupt_and_unsupported_adapters(tmp_path):
    ok = {
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 8),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.zeros(8, 4),
    }
    with pytest.raises(UserError, match="DoRA"):
        read_adapter(_write_adapter(tmp_path / "dora", ok, r=4, alpha=8, use_dora=True))
    with pytest.raises(UserError, match="rank 4 in the weights, 2 in adapter_config.json"):
        read_adapter(_write_adapter(tmp_path / "rank", ok, r=2, alpha=8))
    with pytest.raises(UserError, match="lora_B partner"):
        read_adapter(_write_adapter(tmp_path / "half", {k: v for k, v in ok.items() if "lora_A" in k}, r=4, alpha=8))
    bad = _write_adapter(tmp_path / "garbage", ok, r=4, alpha=8)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="corrupt.*not JSON"):
        read_adapter(bad)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(UserError, match="Adapter config .* is corrupt"):
        read_adapter(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing adapter_config.json, adapter_model.safetensors"):
        read_adapter(tmp_path / "empty")


def test_adapter_for_another_model_is_refused_before_writing(tmp_path, tiny_init_model_dir):
    from lowvram.export.merge import merge_layout

    wrong = {
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 999),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.zeros(128, 4),
    }
    adapter = read_adapter(_write_adapter(tmp_path / "a", wrong, r=4, alpha=8))
    with pytest.raises(UserError, match=r"does not fit the base.*\n.*down_proj.weight: base shape \[128, 344\]"):
        merge_layout(tiny_init_model_dir, adapter, False, "bf16")


@pytest.mark.parametrize("tied", [False, True])
def test_trained_turn_token_rows_live_in_the_adapter_for_plain_peft_and_the_merge(tmp_path, tiny_init_model_dir, tied):
    """lowvram trains untrained turn-token rows through its own wrappers (special_tokens.py) but saves them inside
    the PEFT adapter as PEFT trainable tokens: plain `PeftModel.from_pretrained` gets the trained rows (input
    embeddings and LM head; one shared copy when tied), lowvram's own loading (load_rows) gets them back, and the
    streaming merge writes them into the merged weights. Before, they lay in a side file that PEFT never read."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lowvram.model.adapters import save_policy
    from lowvram.model.hf_backend import lora_config
    from lowvram.model.turn_tokens import load_rows, make_rows_trainable, save_rows, trainable_row_params

    base_dir = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_init_model_dir), dtype=torch.float32)
    if tied:  # one matrix for both, as in SmolLM2 and Gemma
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(str(base_dir))

    def base():
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)

    ids = [4, 5]
    model = base()
    make_rows_trainable(model, ids, scale=8.0)
    model = get_peft_model(model, lora_config(_plan(), _recipe()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_row_params(model):
            p.add_(torch.randn(p.shape, generator=gen))  # "trained"
    want_embed = model.get_input_embeddings().values().detach().clone()
    want_head = model.get_output_embeddings().values().detach().clone()
    assert torch.equal(want_embed, want_head) == tied
    save_policy(model, tmp_path / "adapter")
    assert save_rows(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "lowvram_turn_rows.safetensors").exists()

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(tmp_path / "adapter"))
    torch.testing.assert_close(plain.get_input_embeddings()(torch.tensor([ids]))[0], want_embed)
    head_w = plain.get_output_embeddings().token_adapter.get_merged_weights(["default"])
    torch.testing.assert_close(head_w[ids], want_head)
    saved_ids, rows = load_rows(tmp_path / "adapter")
    assert saved_ids == ids and torch.equal(rows["embed"], want_embed)
    assert ("head" in rows) == (not tied)

    merge_lora(BaseChoice(base_dir, False, "test"), read_adapter(tmp_path / "adapter"), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    tol = dict(rtol=0, atol=float(want_embed.abs().max()) * 2**-7)
    torch.testing.assert_close(merged.get_input_embeddings().weight[ids], want_embed, **tol)
    torch.testing.assert_close(merged.get_output_embeddings().weight[ids], want_head, **tol)


def _plan():
    from types import SimpleNamespace

    return SimpleNamespace(lora_r=4, lora_alpha=8)


def _recipe():
    from types import SimpleNamespace

    return SimpleNamespace(lora=SimpleNamespace(dropout=0.0, target_modules=("q_proj", "v_proj")))
