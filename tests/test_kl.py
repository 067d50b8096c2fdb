"""KL(policy || reference) as lowvram measures it: the exact KL of the next-token distributions at each
position of a sampled answer (never negative), shown with its standard error."""

from __future__ import annotations

import pytest

from lowvram.evaluate.kl import _ratio_sem, _sem, kl_text


def test_kl_is_shown_with_its_standard_error():
    assert kl_text({"kl_per_token": 0.0041, "kl_per_token_sem": 0.0032}) == "0.004 ± 0.003 nats/token"
    # as logged at a held-out eval; a policy equal to its reference reads 0, never "-0.00"
    assert kl_text({"eval_kl_per_token": 0.0, "eval_kl_per_token_sem": 0.0}, "eval_") == "0.000 ± 0.000 nats/token"
    assert kl_text({"kl_per_token": 0.25, "kl_per_token_sem": None}) == "0.250 nats/token"  # one answer: no spread
    assert kl_text({}) is None


def test_the_per_token_standard_error_is_that_of_a_ratio():
    assert _ratio_sem([1.0, 3.0], [1, 1]) == pytest.approx(_sem([1.0, 3.0]))  # equal lengths: the plain one
    # answers of 2 and 6 tokens, each at 0.5 nats/token: no spread in the per-token value
    assert _ratio_sem([1.0, 3.0], [2, 6]) == pytest.approx(0.0)
    assert _ratio_sem([1.0], [2]) is None


def _peft_model(tiny_init_model_dir, noise: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_init_model_dir)),
        LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():  # the reference: the policy, nudged
        for name, p in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(p + noise * torch.randn_like(p))
    return model


def test_kl_is_exact_per_token_and_never_negative(tiny_init_model_dir):
    """Against a brute-force sum over the vocabulary, one unpadded sequence at a time. The old estimate
    (log pi - log pi_ref of the sampled tokens only) differs from it, and for a policy close to its
    reference it can fall below 0 on a single answer, which is how a run printed "KL 0.00 -> -0.00 nats"."""
    import torch
    from transformers import AutoTokenizer

    from lowvram.evaluate.kl import adapter, generate, kl_from_samples, token_kls

    tok = AutoTokenizer.from_pretrained(str(tiny_init_model_dir))
    model = _peft_model(tiny_init_model_dir, noise=0.02)
    prompts = ["What is the capital of France?", "Name a primary colour."]
    with adapter(model, "default"):
        samples = generate(model, tok, prompts, sample=True, n=3, seed=1, max_new_tokens=12)
    pairs = [(p, a) for p, group in zip(prompts, samples) for a in group]
    per_token = token_kls(model, tok, [p for p, _ in pairs], [a for _, a in pairs], "default", "ref")

    model.eval()
    for (prompt, answer), measured in zip(pairs, per_token):
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + answer])
        with torch.no_grad():
            with adapter(model, "default"):
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            with adapter(model, "ref"):
                logq = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        exact = [float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in range(start - 1, ids.shape[1] - 1)]
        assert measured == pytest.approx(exact, abs=1e-5)
        assert all(k >= 0 for k in measured)

    stats = kl_from_samples(model, tok, prompts, samples, "default", "ref")
    sums = [sum(t) for t in per_token]
    assert stats["kl"] == pytest.approx(sum(sums) / len(sums), rel=1e-5)
    assert stats["kl_answers"] == 6 and stats["kl"] > 0
    assert stats["kl_per_token"] == pytest.approx(sum(sums) / sum(len(a) for _, a in pairs), rel=1e-5)
    assert stats["kl_per_token_sem"] > 0
    with adapter(model, "default"):  # what the old estimate summed: the log-ratio of the sampled tokens only
        from lowvram.evaluate.kl import answer_logps

        lp = answer_logps(model, tok, [p for p, _ in pairs], [a for _, a in pairs])
    with adapter(model, "ref"):
        lr = answer_logps(model, tok, [p for p, _ in pairs], [a for _, a in pairs])
    assert [a - b for a, b in zip(lp, lr)] != pytest.approx(sums, abs=1e-4)  # a noisier number than the exact one
