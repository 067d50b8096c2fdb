"""The built-in tiny model's cache (lowvram/model/tiny.py): what each caller gets, and that nothing it does not need is built."""

from __future__ import annotations


def test_counting_tokens_builds_the_tokenizer_alone(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.setenv("LOWVRAM_CACHE", str(tmp_path))  # an empty cache
    from lowvram.model.tiny import ensure_tiny_tokenizer

    tok = ensure_tiny_tokenizer()  # what `plan demo` and `data check --recipe demo` count with: seconds, no weights
    assert [p.name for p in tmp_path.iterdir()] == [tok.name] and not list(tok.glob("*.safetensors"))
    assert ensure_tiny_tokenizer() == tok
    for name in ("tokenizer.model", "tokenizer.json"):  # the tokenizer the (pre)trained model folders hold too
        assert (tok / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes()
