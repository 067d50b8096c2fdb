"""Untrained turn tokens: a base model often has its chat template's control tokens in the vocabulary
but never trained them (Llama 3 base: near-zero rows; Gemma base: rows like its <unusedN> tokens).
LoRA alone cannot teach such a model to end its turn: the end-of-turn row of the LM head stays
untrained, its probability stays near zero, and the fine-tuned model never stops.

    ids = prepare(model, tokenizer, "gemma")   # find, report, set to the mean of trained rows, make trainable
    ...                                        # get_peft_model, then unfreeze trainable_row_params(model)
    save_rows(model, adapter_dir)              # after training: for DPO and export's merge
    restore_rows(model, checkpoint_dir)        # a resumed SFT: the rows as the checkpoint saved them

Detection, per matrix (input embeddings, and the LM head when it is not tied):
- a row whose norm is under NEAR_ZERO of the median row norm (never updated from a zero init), or
- a row inside the cluster of the vocabulary's reserved tokens (<unusedN>, <|reserved_special_token_N|>,
  ...): closer to their centroid than most of them are, and closer than almost every ordinary token.
The fix sets those rows to the mean of the trained rows in both matrices (a neutral start) and
trains exactly those rows (make_rows_trainable): tokens x hidden values, KiB to a few MiB, instead of
whole matrices (modules_to_save: vocab x hidden, 16 bytes a value with AdamW state). The trained rows
are saved beside the adapter (save_rows) for the DPO stage and export's merge, and into every
training checkpoint, from which a resumed SFT restores them (restore_rows).
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

    def _init_rows(self, weight, ids: list[int], rows=None):
        import torch

        self.restored = False  # True: the rows an earlier stage trained (make_rows_trainable's `init`)
        self.register_buffer("row_ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.rows = rows if rows is not None else torch.nn.Parameter(weight[ids].detach().float().clone())

    def patched_weight(self, weight):
        return weight.index_put((self.row_ids,), self.rows.to(weight.dtype))


def _module(torch_nn):
    class TrainableRowsEmbedding(torch_nn.Module, _TrainableRows):
        """An embedding whose rows `ids` train (the others stay frozen): looked up, then replaced where used."""

        def __init__(self, base, ids, rows=None):
            super().__init__()
            self.base = base
            self._init_rows(base.weight, ids, rows)

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
                out[hit] = self.rows[where].to(out.dtype) * getattr(self.base, "embed_scale", 1.0)
            return out

    class TrainableRowsHead(torch_nn.Module, _TrainableRows):
        """An LM head whose rows `ids` train. `weight` is the patched full matrix, because TRL computes the
        loss from `lm_head.weight` directly (a fused, tiled projection), bypassing forward()."""

        def __init__(self, base, ids, rows=None):
            super().__init__()
            self.base = base
            self._init_rows(base.weight, ids, rows)
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


def make_rows_trainable(model, ids: list[int], init: dict | None = None) -> None:
    """Wrap the input embeddings and the LM head so that rows `ids` train (one shared copy when tied).

    Not PEFT's trainable tokens: TRL (1.16) computes the loss from `lm_head.weight` directly, where
    PEFT's wrapper is ignored (and breaks the fused path). `init` maps "embed"/"head" to row values
    to start from (a DPO stage continuing SFT's trained rows).
    """
    import torch

    Emb, Head = _module(torch.nn)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = Emb(emb, ids)
    new_emb.restored = bool(init)
    if init and "embed" in init:
        with torch.no_grad():
            new_emb.rows.copy_(init["embed"])
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = Head(head, ids, rows=new_emb.rows if tied else None)
        new_head.restored = bool(init)
        if init and "head" in init and not tied:
            with torch.no_grad():
                new_head.rows.copy_(init["head"])
        model.set_output_embeddings(new_head)


def trainable_row_params(model) -> list:
    """The `rows` parameters of the wrappers (to unfreeze after PEFT froze everything that is not LoRA)."""
    out = []
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        rows = getattr(m, "rows", None)
        if rows is not None and all(rows is not r for r in out):
            out.append(rows)
    return out


HEAD_ROWS_FILE = "lowvram_turn_rows.safetensors"


def save_rows(model, adapter_dir) -> None:
    """The trained rows of the wrappers, for the next stage and for export's merge; nothing without them."""
    from safetensors.torch import save_file

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(emb, "rows", None) is None:
        return
    names = {m: n for n, m in model.named_modules()}

    def weight_name(m) -> str:
        name = names[m]
        for prefix in ("base_model.model.", "base_model."):
            name = name.removeprefix(prefix)
        return name + ".weight"

    tensors = {"embed": emb.rows.detach().float().contiguous(), "ids": emb.row_ids.cpu()}
    meta = {"embed": weight_name(emb)}
    if head is not None and getattr(head, "rows", None) is not None and head.rows is not emb.rows:
        tensors["head"] = head.rows.detach().float().contiguous()
        meta["head"] = weight_name(head)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(adapter_dir / HEAD_ROWS_FILE), metadata=meta)


def load_rows(adapter_dir) -> tuple[list[int], dict] | None:
    """(ids, {"embed": rows, "head": rows}) saved by save_rows, or None."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(adapter_dir) / HEAD_ROWS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        return f.get_tensor("ids").tolist(), {k: f.get_tensor(k) for k in ("embed", "head") if k in keys}


def restore_rows(model, checkpoint_dir) -> list[int]:
    """Copy a checkpoint's trained rows into the model's row wrappers, in place; the ids (empty: none saved).

    The Trainer's checkpoints hold the LoRA adapter and the optimizer state, not these rows (they are
    lowvram's own parameters, outside PEFT's state dict), so a resumed SFT would start them again from
    the mean while the optimizer's moments continue. In place, so the optimizer state that the Trainer
    restores afterwards still points at these tensors.
    """
    import torch

    saved = load_rows(checkpoint_dir)
    if saved is None:
        return []
    ids, values = saved
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(emb, "rows", None) is None or emb.row_ids.tolist() != ids:
        have = emb.row_ids.tolist() if getattr(emb, "rows", None) is not None else []
        raise RuntimeError(f"{checkpoint_dir}: trained rows of tokens {ids}, the model trains rows {have}")
    with torch.no_grad():
        emb.rows.copy_(values["embed"])
        if "head" in values and getattr(head, "rows", None) is not None and head.rows is not emb.rows:
            head.rows.copy_(values["head"])
    return ids


def train_rows(model, stage: str, method: str = "dpo") -> bool:
    """Unfreeze the rows where this stage should train them (PEFT froze them with the base); whether it does.

    SFT trains them (continuing rows restored from an earlier adapter). ORPO trains them when it starts
    from the base (no SFT before it, no reference model). DPO and KTO keep them frozen: the rows are
    outside the adapter, so training them would move the reference along with the policy.
    """
    restored = any(getattr(m, "restored", False) for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    trainable = stage == "sft" or (method == "orpo" and not restored)
    for rows in trainable_row_params(model):
        rows.requires_grad_(trainable)
    return trainable and bool(trainable_row_params(model))


def trains_rows(model) -> bool:
    """Whether the model has turn-token rows that train (SFT on a base with untrained turn tokens)."""
    return any(p.requires_grad for p in trainable_row_params(model))


def rows_for_merge(adapter_dir) -> dict[str, tuple]:
    """{base weight name: (row values, ids)} for export's merge."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(adapter_dir) / HEAD_ROWS_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        meta, ids = f.metadata(), f.get_tensor("ids").tolist()
        return {meta[k]: (f.get_tensor(k), ids) for k in ("embed", "head") if k in meta}


def memory_note(n_tokens: int, hidden: int, tied: bool, vocab: int) -> str:
    """What training the rows costs: fp32 values + gradient + AdamW's two moments (16 bytes a value), and
    the LM head's patched copy that each forward builds (vocab x hidden, 2 bytes a value in 16-bit)."""
    values = n_tokens * hidden * (1 if tied else 2)
    return (
        f"{values:,} trainable values ({values * 16 / 2**10:,.1f} KiB with AdamW state) and a transient "
        f"copy of the LM head in each forward ({vocab * hidden * 2 / 2**30:.2f} GiB in 16-bit), instead of "
        f"{vocab * hidden * (1 if tied else 2) * 16 / 2**30:.2f} GiB to train whole embedding matrices"
    )


def prepare(model, tokenizer, chat_template: str | None, init_adapter=None, say=print) -> list[int]:
    """Check the template's turn tokens; fix them and make their rows trainable. The ids (empty: none).

    With `init_adapter` (DPO continuing SFT, or SFT --from an adapter), the rows it trained are restored
    instead (train_rows decides whether they train on).
    """
    saved = load_rows(init_adapter) if init_adapter else None
    if saved is not None:
        ids, init = saved
        make_rows_trainable(model, ids, init)
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
    make_rows_trainable(model, ids)
    say(
        f"[tokens] rows set to the mean of the trained rows and trained with the adapter (input embeddings and "
        f"LM head): {memory_note(len(ids), emb.shape[1], tied, emb.shape[0])}"
    )
    return ids
