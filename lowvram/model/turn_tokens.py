"""Untrained turn tokens: a base model often has its chat template's control tokens in the vocabulary
but never trained them (Llama 3 base: near-zero rows; Gemma base: rows like its <unusedN> tokens).
LoRA alone cannot teach such a model to end its turn: the end-of-turn row of the LM head stays
untrained, its probability stays near zero, and the fine-tuned model never stops.

    ids = prepare(model, tokenizer, "gemma", learning_rate=2e-4)   # find, report, set to the mean, make trainable
    ...                                        # add the adapter, then unfreeze trainable_row_params(model)
    save_rows(model, adapter_dir)              # after PEFT saved the adapter: the rows go INTO it
    restore_rows(model, checkpoint_dir)        # a resumed SFT: the rows as the checkpoint saved them

Detection, per matrix (input embeddings, and the LM head when it is not tied):
- a row whose norm is under NEAR_ZERO of the median row norm (never updated from a zero init), or
- a row inside the cluster of the vocabulary's reserved tokens (<unusedN>, <|reserved_special_token_N|>,
  ...): closer to their centroid than most of them are, and closer than almost every ordinary token.
The fix sets those rows to the mean of the trained rows in both matrices (a neutral start) and
trains exactly those rows (make_rows_trainable): tokens x hidden values, KiB to a few MiB, instead of
whole matrices (modules_to_save: vocab x hidden, 16 bytes a value with AdamW state).

The rows train faster than the adapter (row_scale). Adam moves a weight by about the learning rate
per step, whatever its gradient; a LoRA rate (2e-4) moves a row by 0.005 in 24 steps, while the
end-of-turn row must travel a good part of a trained row's size (coordinates around 0.1) before its
logit beats the ~50k others. Measured on SmolLM2-135M with these rows reset: after 24 SFT steps at
2e-4 the end-of-turn token still ranked about 17,000th right after a training answer, and no answer
ended its turn. So each row is stored divided by a scale and used multiplied by it: the optimizer's
step on it is `scale` times larger, with no second optimizer group (any optimizer, resume included).

The trained rows are saved INSIDE the PEFT adapter, in PEFT's own trainable-tokens format
(`trainable_token_indices` in adapter_config.json, `<module>.token_adapter.trainable_tokens_delta`
in adapter_model.safetensors; for tied embeddings the input embeddings' only, as PEFT does), so
`PeftModel.from_pretrained(base, adapter)` (and anything that loads PEFT adapters) gets them, and
export's merge writes them into the merged weights. Training does not use PEFT's wrapper: TRL's DPO
computes log-probabilities from `lm_head.weight` directly (and refuses a PEFT layer on the head),
so lowvram trains through its own wrappers and loads its adapters with that entry stripped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowvram.data.templates import resolve_chat_template

NEAR_ZERO = 0.1  # of the median row norm
RESERVED = re.compile(
    r"^(<unused\d+>|<\|reserved_special_token_\d+\|>|\[unused\d+\]|<extra_id_\d+>|<\|extra_\d+\|>"
    r"|<\|unused_?\d+\|>|<reserved_\d+>)$"
)
MIN_RESERVED = 4
SAMPLE_ROWS = 20000


@dataclass(frozen=True)
class Untrained:
    token: str
    token_id: int
    where: tuple[str, ...]  # "input embeddings", "LM head"
    why: str

    def line(self) -> str:
        return f"{self.token} (id {self.token_id}): {self.why} in the {' and '.join(self.where)}"


def turn_tokens(tokenizer, chat_template: str | None) -> list[str]:
    """The control tokens a chat template relies on: its named tokens, or the special tokens it emits."""

    named = resolve_chat_template(chat_template) if chat_template else None
    eos = tokenizer.eos_token
    if named is not None:
        tokens = [*named.control_tokens, named.turn_end(eos)]
    else:
        tokens = []
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            try:
                text = tokenizer.apply_chat_template(msgs, tokenize=False)
            except Exception:
                text = ""
            specials = [str(t) for t in tokenizer.all_special_tokens]
            specials += [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
            tokens = [t for t in dict.fromkeys(specials) if t and t in text and t != tokenizer.bos_token]
    vocab = tokenizer.get_vocab()
    return [t for t in dict.fromkeys(tokens) if t and t in vocab]


def _matrices(model) -> list[tuple[str, object]]:
    emb = model.get_input_embeddings().weight
    out = [("input embeddings", emb)]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        out.append(("LM head", head.weight))
    return out


def _reference_ids(tokenizer, vocab_rows: int, exclude: set[int]) -> tuple[list[int], list[int]]:
    """(reserved-token ids, a sample of ordinary token ids)."""
    import random

    vocab = tokenizer.get_vocab()
    reserved = sorted(i for t, i in vocab.items() if RESERVED.match(t) and i < vocab_rows)
    special = {i for i in tokenizer.all_special_ids}
    skip = exclude | set(reserved) | special
    ordinary = [i for i in range(vocab_rows) if i not in skip]
    if len(ordinary) > SAMPLE_ROWS:
        ordinary = random.Random(0).sample(ordinary, SAMPLE_ROWS)
    return reserved, ordinary


def find_untrained(model, tokenizer, tokens: list[str]) -> list[Untrained]:
    """The tokens among `tokens` whose rows look untrained; empty when all look trained."""
    import torch

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    found: dict[str, tuple[list[str], str]] = {}
    with torch.no_grad():
        for where, weight in _matrices(model):
            w = weight.detach()  # rows are indexed, then upcast: no fp32 copy of the whole matrix
            reserved, ordinary = _reference_ids(tokenizer, w.shape[0], set(ids.values()))
            if not ordinary:
                continue
            sample = w[ordinary].float()
            med = sample.norm(dim=1).median().item()
            cluster = None
            if len(reserved) >= MIN_RESERVED:
                res = w[reserved].float()
                centre = res.mean(0)
                spread = (res - centre).norm(dim=1).quantile(0.9).item()
                ordinary_near = (sample - centre).norm(dim=1).quantile(0.01).item()
                cluster = (centre, spread, ordinary_near)
            for t, i in ids.items():
                if i is None or i >= w.shape[0]:
                    continue
                norm = w[i].float().norm().item()
                why = None
                if norm < NEAR_ZERO * med:
                    why = f"row norm {norm:.3g}, {norm / med:.1%} of a trained token's"
                elif cluster is not None:
                    d = (w[i].float() - cluster[0]).norm().item()
                    if d <= cluster[1] and d < cluster[2]:
                        why = "its row sits among the unused reserved tokens'"
                if why:
                    wheres, first = found.get(t, ([], why))
                    found[t] = ([*wheres, where], first)
    return [Untrained(t, ids[t], tuple(w), why) for t, (w, why) in found.items()]


def fix_untrained(model, untrained: list[Untrained], tokenizer=None) -> list[int]:
    """Set each untrained row to the mean of the trained rows; the token ids to train."""
    import torch

    bad = sorted({u.token_id for u in untrained})
    if not bad:
        return []
    with torch.no_grad():
        for _, weight in _matrices(model):
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[bad] = False
            if tokenizer is not None:
                reserved, _ = _reference_ids(tokenizer, weight.shape[0], set(bad))
                keep[reserved] = False
            chunks = range(0, weight.shape[0], 16384)  # in chunks: no fp32 copy of the whole matrix
            norms = torch.cat([weight[s : s + 16384].float().norm(dim=1) for s in chunks])
            keep &= (norms >= NEAR_ZERO * norms[keep].median()).to(keep.device)
            total = sum(weight[s : s + 16384][keep[s : s + 16384].to(weight.device)].float().sum(0) for s in chunks)
            weight[bad] = (total / keep.sum()).to(weight.dtype)
    return bad


class _TrainableRows:
    """Shared by the two wrappers: the rows `ids` of a frozen weight are replaced by a trainable copy."""

    def _init_rows(self, weight, ids: list[int], rows=None, scale: float = 1.0):
        import torch

        self.restored = False  # True: the rows an earlier stage trained (make_rows_trainable's `init`)
        self.scale = scale  # the rows' values are `rows * scale` (see row_scale)
        self.register_buffer("row_ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.rows = rows if rows is not None else torch.nn.Parameter(weight[ids].detach().float().clone() / scale)

    def values(self):
        """The rows' values (the parameter times its scale)."""
        return self.rows * self.scale

    def set_values(self, values) -> None:
        """In place, so an optimizer's state still points at the parameter."""
        import torch

        with torch.no_grad():
            self.rows.copy_(values.to(self.rows) / self.scale)

    def patched_weight(self, weight):
        return weight.index_put((self.row_ids,), self.values().to(weight.dtype))


def _module(torch_nn):
    class TrainableRowsEmbedding(torch_nn.Module, _TrainableRows):
        """An embedding whose rows `ids` train (the others stay frozen): looked up, then replaced where used."""

        def __init__(self, base, ids, rows=None, scale=1.0):
            super().__init__()
            self.base = base
            self._init_rows(base.weight, ids, rows, scale)

        @property
        def weight(self):
            return self.patched_weight(self.base.weight)

        def forward(self, x):
            import torch

            out = self.base(x)
            hit = torch.isin(x, self.row_ids)
            if hit.any():
                where = (x[hit].unsqueeze(-1) == self.row_ids).float().argmax(-1)
                out = out.clone()
                out[hit] = self.values()[where].to(out.dtype) * getattr(self.base, "embed_scale", 1.0)
            return out

    class TrainableRowsHead(torch_nn.Module, _TrainableRows):
        """An LM head whose rows `ids` train. `weight` is the patched full matrix, because TRL computes the
        loss from `lm_head.weight` directly (a fused, tiled projection), bypassing forward()."""

        def __init__(self, base, ids, rows=None, scale=1.0):
            super().__init__()
            self.base = base
            self._init_rows(base.weight, ids, rows, scale)
            self.in_features, self.out_features = base.in_features, base.out_features

        @property
        def weight(self):
            return self.patched_weight(self.base.weight)

        @property
        def bias(self):
            return self.base.bias

        def forward(self, x):
            import torch

            return torch.nn.functional.linear(x, self.weight, self.bias)

    return TrainableRowsEmbedding, TrainableRowsHead


ROW_STEPS = 10  # optimizer steps in which a row can move by a trained row's typical coordinate


def row_scale(weight, ids: list[int], learning_rate: float | None) -> float:
    """How much faster than the adapter the rows train: at `learning_rate`, Adam moves each value by about
    `learning_rate * scale` a step, which lets a row cover a trained row's typical coordinate (its RMS) in
    ROW_STEPS steps. 1 when the rate is that fast already, or unknown."""
    import torch

    if not learning_rate or learning_rate <= 0:
        return 1.0
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[ids] = False
    sample = torch.nonzero(keep).flatten()[:: max(1, int(keep.sum()) // SAMPLE_ROWS)]
    rms = weight[sample.to(weight.device)].detach().float().pow(2).mean().sqrt().item()
    return max(1.0, rms / (ROW_STEPS * learning_rate))


def make_rows_trainable(model, ids: list[int], init: dict | None = None, scale: float = 1.0) -> None:
    """Wrap the input embeddings and the LM head so that rows `ids` train (one shared copy when tied).

    Not PEFT's trainable tokens: TRL (1.16) computes the loss from `lm_head.weight` directly, where
    PEFT's wrapper is ignored (and breaks the fused path). `init` maps "embed"/"head" to row values
    to start from (a DPO stage continuing SFT's trained rows). `scale`: see row_scale.
    """
    Emb, Head = _module(__import__("torch").nn)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = Emb(emb, ids, scale=scale)
    new_emb.restored = bool(init)
    if init and "embed" in init:
        new_emb.set_values(init["embed"])
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = Head(head, ids, rows=new_emb.rows if tied else None, scale=scale)
        new_head.restored = bool(init)
        if init and "head" in init and not tied:
            new_head.set_values(init["head"])
        model.set_output_embeddings(new_head)


def trainable_row_params(model) -> list:
    """The `rows` parameters of the wrappers (to unfreeze after PEFT froze everything that is not LoRA)."""
    out = []
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        rows = getattr(m, "rows", None)
        if rows is not None and all(rows is not r for r in out):
            out.append(rows)
    return out


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKEN_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?")


def _module_path(model, module) -> str:
    name = {m: n for n, m in model.named_modules()}[module]
    for prefix in ("base_model.model.", "base_model."):
        name = name.removeprefix(prefix)
    return name


def save_rows(model, adapter_dir) -> bool:
    """Write the wrappers' trained rows into the PEFT adapter in `adapter_dir` (already saved there), in PEFT's
    trainable-tokens format; whether there were any. For tied embeddings only the input embeddings' rows
    are written (PEFT ties the head to them when it loads the adapter)."""
    import json
    import os
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(emb, "rows", None) is None:
        return False
    adapter_dir = Path(adapter_dir)
    ids = emb.row_ids.tolist()
    rows = {_module_path(model, emb): emb.values()}
    if head is not None and getattr(head, "rows", None) is not None and head.rows is not emb.rows:
        rows[_module_path(model, head)] = head.values()
    weights, cfg_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(weights)).items() if not TOKEN_KEY.fullmatch(k)}
    for name, values in rows.items():
        tensors[f"base_model.model.{name}.token_adapter.trainable_tokens_delta"] = values.detach().float().cpu()
    cfg = json.loads(cfg_path.read_text())
    cfg["trainable_token_indices"] = {name: ids for name in rows}
    for path, write in (
        (weights, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)),
        (cfg_path, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))),
    ):
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)
    return True


def load_rows(adapter_dir) -> tuple[list[int], dict] | None:
    """(ids, {"embed": rows, "head": rows}) of a PEFT adapter's trainable tokens (save_rows), or None."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    cfg_path, weights = Path(adapter_dir) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        return None
    indices = json.loads(cfg_path.read_text()).get("trainable_token_indices")
    if not indices:
        return None
    if isinstance(indices, list):  # PEFT's shorthand: the input embeddings' rows
        indices = {"embed_tokens": indices}
    out: dict = {}
    ids: list[int] | None = None
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            m = TOKEN_KEY.fullmatch(key)
            if not m:
                continue
            module = m.group(1)
            idx = next((v for k, v in indices.items() if module == k or module.endswith("." + k)), None)
            which = "head" if module.split(".")[-1] in ("lm_head", "output", "embed_out") else "embed"
            if idx is None or (ids is not None and list(idx) != ids):
                raise ValueError(f"{weights}: trainable tokens of {module} do not match trainable_token_indices")
            ids, out[which] = list(idx), f.get_tensor(key)
    return (ids, out) if ids is not None and "embed" in out else None


def without_rows(adapter_dir):
    """The adapter's PeftConfig with its trainable tokens left out, for lowvram's own loading (its wrappers
    hold the rows, from load_rows): PEFT's wrapper on the LM head would break TRL's DPO."""
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    if getattr(cfg, "trainable_token_indices", None):
        cfg.trainable_token_indices = None
    return cfg


def restore_rows(model, checkpoint_dir) -> list[int]:
    """Copy a checkpoint's trained rows into the model's row wrappers, in place; the ids (empty: none saved).

    The Trainer's checkpoints hold the LoRA adapter and the optimizer state; the rows are lowvram's own
    parameters, outside PEFT's state dict, written into the checkpoint's adapter by save_rows. In place, so
    the optimizer state that the Trainer restores afterwards still points at these tensors.
    """
    saved = load_rows(checkpoint_dir)
    if saved is None:
        return []
    ids, values = saved
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(emb, "rows", None) is None or emb.row_ids.tolist() != ids:
        have = emb.row_ids.tolist() if getattr(emb, "rows", None) is not None else []
        raise RuntimeError(f"{checkpoint_dir}: trained rows of tokens {ids}, the model trains rows {have}")
    emb.set_values(values["embed"])
    if "head" in values and getattr(head, "rows", None) is not None and head.rows is not emb.rows:
        head.set_values(values["head"])
    return ids


def train_rows(model, stage: str, method: str = "dpo") -> bool:
    """Unfreeze the rows where this stage should train them (PEFT froze them with the base); whether it does.

    SFT trains them (continuing rows restored from an earlier adapter). ORPO trains them when it starts
    from the base (no SFT before it, no reference model). DPO and KTO keep them frozen: the reference is
    the SFT adapter with these same rows, so training them would move the reference along with the policy.
    """
    restored = any(getattr(m, "restored", False) for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    trainable = stage == "sft" or (method == "orpo" and not restored)
    for rows in trainable_row_params(model):
        rows.requires_grad_(trainable)
    return trainable and bool(trainable_row_params(model))


def trains_rows(model) -> bool:
    """Whether the model has turn-token rows that train (SFT on a base with untrained turn tokens)."""
    return any(p.requires_grad for p in trainable_row_params(model))


def memory_note(n_tokens: int, hidden: int, tied: bool, vocab: int) -> str:
    """What training the rows costs: fp32 values + gradient + AdamW's two moments (16 bytes a value), and
    the LM head's patched copy that each forward builds (vocab x hidden, 2 bytes a value in 16-bit)."""
    values = n_tokens * hidden * (1 if tied else 2)
    return (
        f"{values:,} trainable values ({values * 16 / 2**10:,.1f} KiB with AdamW state) and a transient "
        f"copy of the LM head in each forward ({vocab * hidden * 2 / 2**30:.2f} GiB in 16-bit), instead of "
        f"{vocab * hidden * (1 if tied else 2) * 16 / 2**30:.2f} GiB to train whole embedding matrices"
    )


def prepare(
    model, tokenizer, chat_template: str | None, init_adapter=None, learning_rate: float | None = None, say=print
) -> list[int]:
    """Check the template's turn tokens; fix them and make their rows trainable. The ids (empty: none).

    With `init_adapter` (DPO continuing SFT, or SFT --from an adapter), the rows it trained are restored
    instead (train_rows decides whether they train on). `learning_rate`: the stage's, for row_scale.
    """
    saved = load_rows(init_adapter) if init_adapter else None
    if saved is not None:
        ids, init = saved
        scale = row_scale(model.get_input_embeddings().weight, ids, learning_rate)
        make_rows_trainable(model, ids, init, scale)
        say(f"[tokens] turn-token rows {ids} restored from {init_adapter}")
        return ids
    tokens = turn_tokens(tokenizer, chat_template)
    if not tokens:
        return []
    untrained = find_untrained(model, tokenizer, tokens)
    if not untrained:
        say(f"[tokens] turn tokens look trained: {', '.join(tokens)}")
        return []
    for u in untrained:
        say(f"[tokens] untrained: {u.line()}")
    ids = fix_untrained(model, untrained, tokenizer)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.data_ptr()
    scale = row_scale(emb, ids, learning_rate)
    make_rows_trainable(model, ids, scale=scale)
    say(
        f"[tokens] rows set to the mean of the trained rows and trained with the adapter (input embeddings and "
        f"LM head): {memory_note(len(ids), emb.shape[1], tied, emb.shape[0])}"
    )
    if scale > 1:
        say(
            f"[tokens] the rows train {scale:.0f}x faster than the adapter: at learning rate {learning_rate:g} a row "
            f"can move by a trained row's typical value in {ROW_STEPS} steps (a new end-of-turn row must travel "
            "that far before the model ends its turns)"
        )
    say("[tokens] the trained rows are saved inside the adapter (PEFT trainable tokens: plain PEFT loads them)")
    return ids
