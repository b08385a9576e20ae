"""Native scoring of a live causal LM: multiple-choice log-likelihoods, greedy generation and perplexity.

Tokenizes each task once, exactly as lm-eval's HFLM does; never loads, copies or modifies model weights.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from evaluators import EvalError, NonFiniteError
from evaluators.tasks import GenerateItem, Item, MultipleChoiceItem, PerplexityItem

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer names a context length


class LmEvalEncoder:
    """Token ids exactly as lm-eval 0.4's HFLM makes them (the tokenizer's own special-token default, no
    truncation; for a context/continuation pair, trailing context spaces move onto the continuation)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id: int = bos if bos is not None else eos
        self._prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM.tok_encode: the tokenizer's default unless told; never a second BOS on a BOS-prefixed text."""
        if add_special_tokens is None and self._prefix_text and text.startswith(self._prefix_text):
            add_special_tokens = False
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(text, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's (context, continuation) split: encode the whole, cut at the context's own length."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def max_length(model, tokenizer=None) -> int:
    """The model's context length, resolved like lm-eval (config, then tokenizer, then 2048)."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**12:
        return tok_max
    return DEFAULT_MAX_LENGTH


def chat_prompt(tokenizer, text: str, system: str | None = None) -> str:
    """`text` as lm-eval 0.4 renders a zero-shot doc under `apply_chat_template`: an optional system turn
    (`system_instruction`), one user turn, then the assistant's generation prompt, through the tokenizer's chat
    template (HFLM.apply_chat_template; a template that rejects the system turn is retried without it)."""
    import jinja2

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    options = {"tokenize": False, "add_generation_prompt": True, "continue_final_message": False}
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except jinja2.exceptions.TemplateError:
        log.warning("the chat template rejects a system turn: rendering without it (as lm-eval does)")
        return tokenizer.apply_chat_template([m for m in messages if m["role"] != "system"], **options)


def chat_items(items: Sequence[Item], tokenizer, system: str | None, task: str) -> list[Item]:
    """Items re-written for a chat model: the query/prompt becomes the rendered chat (see chat_prompt); a
    choice loses its leading whitespace (the delimiter a plain prompt needs), as lm-eval drops
    `target_delimiter` under apply_chat_template. Perplexity texts take no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError("the tokenizer has no chat template (chat_template: true needs one)", task)
    out: list[Item] = []
    for item in items:
        if isinstance(item, MultipleChoiceItem):
            choices = tuple(c.lstrip() for c in item.choices)
            if not all(choices):
                raise EvalError(f"a choice of item {item.id!r} is only whitespace", task)
            out.append(MultipleChoiceItem(item.id, chat_prompt(tokenizer, item.query, system), choices, item.gold))
        elif isinstance(item, GenerateItem):
            out.append(GenerateItem(item.id, chat_prompt(tokenizer, item.prompt, system), item.target, item.stop))
        else:
            raise EvalError("a perplexity task takes no chat template", task)
    return out


@dataclass(frozen=True)
class Runtime:
    """Where and in which dtype the model computes inside `inference`."""

    device: torch.device
    dtype: torch.dtype


@contextmanager
def inference(model, autocast: bool) -> Iterator[Runtime]:
    """inference_mode, plus bf16 autocast on CUDA for float32 weights when `autocast`."""
    param = next(model.parameters())
    use_autocast = autocast and param.device.type == "cuda" and param.dtype == torch.float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else nullcontext()
    with torch.inference_mode(), amp:
        yield Runtime(param.device, torch.bfloat16 if use_autocast else param.dtype)


@dataclass(frozen=True)
class _Forward:
    """What this model's forward takes: the KV cache argument (`cache` in recent transformers, else
    `past_key_values`), `logits_to_keep` (skip the LM head where nothing is scored), `position_ids`, and
    which attention implementation runs (custom 4D masks need sdpa or eager)."""

    cache_arg: str
    logits_to_keep: bool
    position_ids: bool
    attention: str
    plain_cache: bool  # every layer's KV cache is a plain DynamicLayer: rows may be repeated, padded, joined

    @classmethod
    def of(cls, model) -> _Forward:
        params = inspect.signature(model.forward).parameters
        return cls("cache" if "cache" in params else "past_key_values", "logits_to_keep" in params,
                   "position_ids" in params, str(getattr(model.config, "_attn_implementation", None) or "eager"),
                   "position_ids" in params and _plain_cache(model))

    def check_packable(self, task: str) -> None:
        """Packed multiple-choice rows need position_ids and a 4D attention mask (sdpa or eager attention)."""
        if not self.position_ids or self.attention.startswith(("flash", "flex", "paged")):
            raise EvalError(f"multiple-choice scoring needs a model that takes position_ids and a 4D attention "
                            f"mask (attn_implementation sdpa or eager, not {self.attention})", task)

    def last_only(self) -> dict:
        return {"logits_to_keep": 1} if self.logits_to_keep else {}

    def with_cache(self, cache) -> dict:
        return {self.cache_arg: cache, "use_cache": True}


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _plain_cache(model) -> bool:
    """Whether this model's KV cache is one plain DynamicLayer per layer (no sliding window, chunking or
    sharing): only then may evaluators repeat, pad and join its tensors."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
    except Exception:  # an architecture or transformers version without this cache API
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _new_cache(states: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(states))


MIN_PREFIX_SAVING = 32  # tokens: an extra forward for a shared prefix must save at least this much


def _common_prefix(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all of `seqs` share, at most `limit`."""
    first, n = seqs[0], limit
    for seq in seqs[1:]:
        k = 0
        while k < n and seq[k] == first[k]:
            k += 1
        n = k
        if not n:
            break
    return max(n, 0)


class _Prefix:
    """The key/value states of a token prefix that every row of a call starts with (a system prompt, a chat
    header, an instruction): computed once with batch 1, then repeated for each batch, so a row computes only
    the tokens after it. Positions and results are those of the full rows (within float rounding)."""

    def __init__(self, model, tokens: Sequence[int], device: torch.device, fwd: _Forward):
        out = model(input_ids=torch.tensor([list(tokens)], device=device), use_cache=True, **fwd.last_only())
        self.length = len(tokens)
        self.states = [(layer.keys, layer.values) for layer in _cache_of(out).layers]

    @classmethod
    def shared(cls, model, seqs: Sequence[Sequence[int]], limit: int, device: torch.device,
               fwd: _Forward) -> _Prefix | None:
        """The prefix common to `seqs` (at most `limit` tokens), or None where sharing does not pay."""
        if not fwd.plain_cache or len(seqs) < 2 or limit < 1:
            return None
        n = _common_prefix(seqs, limit)
        return cls(model, seqs[0][:n], device, fwd) if n * (len(seqs) - 1) >= MIN_PREFIX_SAVING else None

    def cache(self, batch: int):
        """A fresh cache holding the prefix for `batch` rows."""
        return _new_cache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.states])


def _pad_right(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _check_finite(values: torch.Tensor, task: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError("the model produced non-finite log-likelihoods (NaN/inf in its weights or "
                             "activations)", task)


def _batches(order: Sequence[T], size: int, length: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive batches of at most `size` from `order` (sorted longest first); a batch also ends where a
    row is under half the batch's first length, so padding never more than doubles the work."""
    batch: list[T] = []
    for entry in order:
        if batch and (len(batch) == size or 2 * length(entry) < length(batch[0])):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


@dataclass(frozen=True)
class _Packed:
    """One multiple-choice item as ONE row: its context, then a token trie of the choices' inputs
    (continuation[:-1]) in which each node sees the context and its own ancestors only. Shared context
    and shared choice prefixes are computed once; each choice token is scored at the row that predicts it."""

    context_len: int
    tokens: torch.Tensor          # [n] token ids: context, then trie nodes
    positions: torch.Tensor       # [n] position ids: a node sits right after its parent
    trie_mask: torch.Tensor       # [nodes, nodes] bool: node q sees node k
    rows: torch.Tensor            # [m] the row whose logits predict each scored token ...
    targets: torch.Tensor         # [m] ... that token ...
    choices: torch.Tensor         # [m] ... and the choice it belongs to
    n_choices: int

    @classmethod
    def build(cls, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> _Packed:
        width = len(context)
        tokens, positions = list(context), list(range(width))
        parent: dict[int, int] = {}
        node: dict[tuple[int, int], int] = {}
        predict = []
        for choice, cont in enumerate(continuations):
            at = width - 1
            predict.append((at, cont[0], choice))
            for depth, token in enumerate(cont[:-1]):
                if (at, token) not in node:
                    node[(at, token)] = len(tokens)
                    parent[len(tokens)] = at
                    tokens.append(token)
                    positions.append(width + depth)
                at = node[(at, token)]
                predict.append((at, cont[depth + 1], choice))
        trie_mask = torch.zeros(len(tokens) - width, len(tokens) - width, dtype=torch.bool)
        for row in range(width, len(tokens)):
            at = row
            while at >= width:
                trie_mask[row - width, at - width] = True
                at = parent[at]
        rows, targets, choices = torch.tensor(predict, dtype=torch.long).unbind(dim=1)
        return cls(width, torch.tensor(tokens), torch.tensor(positions), trie_mask, rows, targets, choices,
                   len(continuations))


@dataclass(frozen=True)
class _Choices:
    """One multiple-choice item as lm-eval feeds it: the context ids and one continuation per choice."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]           # characters per choice, for acc_norm
    gold: int
    packed: _Packed


class MultipleChoiceScorer:
    """acc / acc_norm from the log-likelihood of each choice as a continuation of the query.

    Each item is one packed row (context + a trie of the choices, see _Packed) under a 4D attention mask:
    one forward per `batch_size` items (sorted by length), the LM head applied only at rows that predict a
    choice token; a token prefix shared by every item of a call is computed once (see _Prefix).
    """

    metrics = ("acc", "acc_norm")

    def __init__(self, items: Sequence[MultipleChoiceItem], tokenizer, *, name: str = "multiple_choice",
                 batch_size: int = 32, autocast: bool = True):
        self.name, self.batch_size, self.autocast, self.tokenizer = name, batch_size, autocast, tokenizer
        encoder = LmEvalEncoder(tokenizer)
        self.pad_id = _pad_id(tokenizer)
        self.items = [self._encode(encoder, item) for item in items]
        self._fit_cache: dict[tuple[int, int], list[tuple[_Packed, tuple[int, ...]]]] = {}

    def _encode(self, encoder: LmEvalEncoder, item: MultipleChoiceItem) -> _Choices:
        pairs = [encoder.encode_pair(item.query, choice) for choice in item.choices]
        for i, (_, cont) in enumerate(pairs):
            if not cont:
                raise EvalError(f"choice {i} of item {item.id!r} tokenizes to nothing", self.name)
        context, continuations = tuple(pairs[0][0]), tuple(tuple(c) for _, c in pairs)
        return _Choices(context, continuations, tuple(len(c) for c in item.choices), item.gold,
                        _Packed.build(context, continuations))

    def loglikelihoods(self, model, which: Sequence[int]) -> list[list[float]]:
        """Summed continuation log-probabilities, one list (per choice) for each item index in `which`."""
        limit = max_length(model, self.tokenizer)
        rows = [(i, pack, choices) for i in which for pack, choices in self._fitted(i, limit)]
        rows.sort(key=lambda row: -len(row[1].tokens))
        out = {i: [0.0] * len(self.items[i].continuations) for i in which}
        with inference(model, self.autocast) as run:
            fwd = _Forward.of(model)
            fwd.check_packable(self.name)
            packs = [pack for _, pack, _ in rows]
            prefix = _Prefix.shared(model, [pack.tokens.tolist() for pack in packs],
                                    min(pack.context_len for pack in packs) - 1, run.device, fwd)
            for batch in _batches(rows, self.batch_size, lambda row: len(row[1].tokens)):
                scored = self._score_batch(model, [pack for _, pack, _ in batch], run.device, run.dtype, fwd,
                                           prefix)
                for (i, _, choices), lls in zip(batch, scored, strict=True):
                    for choice, value in zip(choices, lls, strict=True):
                        out[i][choice] = value
        return [out[i] for i in which]

    def _fitted(self, i: int, limit: int) -> list[tuple[_Packed, tuple[int, ...]]]:
        if (i, limit) not in self._fit_cache:
            self._fit_cache[(i, limit)] = _fit(self.items[i], limit, self.name)
        return self._fit_cache[(i, limit)]

    def _score_batch(self, model, packs: list[_Packed], device: torch.device, dtype: torch.dtype,
                     fwd: _Forward, prefix: _Prefix | None = None) -> list[list[float]]:
        """One forward over `packs` (minus the shared `prefix`, whose keys/values come from its cache)."""
        skip = prefix.length if prefix else 0
        width = max(len(p.tokens) for p in packs) - skip
        input_ids = torch.full((len(packs), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(packs), width), dtype=torch.long)
        allowed = torch.zeros((len(packs), width, skip + width), dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        for b, p in enumerate(packs):
            n, ctx = len(p.tokens) - skip, p.context_len - skip
            input_ids[b, :n] = p.tokens[skip:]
            positions[b, :n] = p.positions[skip:]
            allowed[b, :n, skip:skip + n] = causal[:n, :n]
            allowed[b, ctx:n, skip + ctx:skip + n] = p.trie_mask
        allowed[:, :, :skip] = True                                # every row sees the shared prefix
        allowed[:, :, skip:] |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no empty softmax
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        offsets = torch.tensor([0, *(p.n_choices for p in packs)]).cumsum(dim=0)
        batch = torch.cat([torch.full_like(p.rows, b) for b, p in enumerate(packs)]).to(device)
        rows = torch.cat([p.rows - skip for p in packs]).to(device)
        targets = torch.cat([p.targets for p in packs]).to(device)
        owner = torch.cat([p.choices + offsets[b] for b, p in enumerate(packs)]).to(device)
        extra = {}
        if fwd.logits_to_keep:  # the LM head runs only on rows that predict a scored token
            keep = torch.unique(rows)
            extra, rows = {"logits_to_keep": keep}, torch.searchsorted(keep, rows)
        if prefix is not None:
            extra.update(fwd.with_cache(prefix.cache(len(packs))))
        logits = model(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                       position_ids=positions.to(device), **extra).logits
        logprobs = F.log_softmax(logits[batch, rows].float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        totals = torch.zeros(int(offsets[-1]), device=device).index_add_(0, owner, logprobs)
        _check_finite(totals, self.name)
        flat, bounds = totals.tolist(), offsets.tolist()
        return [flat[bounds[b]:bounds[b + 1]] for b in range(len(packs))]

    def score(self, model, which: Sequence[int]) -> list[dict[str, float]]:
        """Per item: acc (argmax of log-likelihoods is gold) and acc_norm (of log-likelihood per character)."""
        scores = []
        for i, lls in zip(which, self.loglikelihoods(model, which), strict=True):
            item = self.items[i]
            normed = [ll / n for ll, n in zip(lls, item.lengths, strict=True)]
            scores.append({"acc": float(_argmax(lls) == item.gold), "acc_norm": float(_argmax(normed) == item.gold)})
        return scores


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, like numpy


def _fit(item: _Choices, limit: int, task: str) -> list[tuple[_Packed, tuple[int, ...]]]:
    """(packed row, the choices it scores). lm-eval feeds at most `limit` tokens of context +
    continuation[:-1], cutting the oldest context tokens per choice; an item that does not fit becomes
    one row per choice, each cut as lm-eval cuts it."""
    longest = max(map(len, item.continuations))
    if len(item.context) + longest - 1 <= limit:
        return [(item.packed, tuple(range(len(item.continuations))))]
    if longest > limit:
        raise EvalError(f"a choice of {longest} tokens is longer than the model's context length", task)
    log.warning("%s: a context of %d tokens is cut from the left to fit the model", task, len(item.context))
    return [(_Packed.build(item.context[-(limit + 1 - len(cont)):], [cont]), (choice,))
            for choice, cont in enumerate(item.continuations)]


class _Decoding:
    """The rows being decoded together: one item per row, its KV cache (left-padded, plus a shared prefix),
    attention mask, last position and the logits of its next token (not yet consumed)."""

    def __init__(self, model, items: list[int], prompts: Sequence[Sequence[int]], pad_id: int,
                 device: torch.device, fwd: _Forward, prefix: _Prefix | None = None):
        """Prefill `prompts` (each starting with `prefix`, whose keys/values come from its cache), left-padded."""
        skip = prefix.length if prefix else 0
        rows = [list(p[skip:]) for p in prompts]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[1] * skip + [0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, skip:]
        cache = fwd.with_cache(prefix.cache(len(rows))) if prefix is not None else {"use_cache": True}
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **cache, **fwd.last_only())
        self.items, self.fwd = list(items), fwd
        self.logits, self.cache, self.mask = out.logits[:, -1, :], _cache_of(out), mask
        self.last_pos = positions[:, -1:]

    def __len__(self) -> int:
        return len(self.items)

    def join(self, other: _Decoding) -> None:
        """Append `other`'s rows (a plain cache only): the shorter side is left-padded to a common width."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if not missing:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, -2), pad(theirs.keys, -2)])
            mine.values = torch.cat([pad(mine.values, -2), pad(theirs.values, -2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        self.last_pos = torch.cat([self.last_pos, other.last_pos])
        self.items += other.items

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (positions in this batch); drop the leading columns no row attends to any more."""
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.logits, self.last_pos = self.mask[index], self.logits[index], self.last_pos[index]
        self.items = [self.items[k] for k in rows]
        dead = int(self.mask.any(dim=0).int().argmax())
        if dead and self.fwd.plain_cache:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., dead:, :], layer.values[..., dead:, :]
            self.mask = self.mask[:, dead:]

    def step(self, model, tokens: torch.Tensor) -> None:
        """Feed one token per row; its logits become the rows' next-token logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        self.last_pos = self.last_pos + 1
        self.logits = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.last_pos,
                            **self.fwd.with_cache(self.cache)).logits[:, -1, :]


class GenerateScorer:
    """exact_match of greedy decoding (KV cache, left padding) cut at the first stop string, or eos,
    or `max_new_tokens`, against the target (both stripped of surrounding whitespace).

    Each row stops on its own and leaves the batch; prompts (longest first, so a prefill pads little) join the
    running batch as rows leave, a quarter of the batch at a time, so most steps run a full batch. A prompt
    prefix shared by every item (a system prompt, a chat header) is computed once per call. When scoring
    (`score`), a row also leaves once its text can no longer match its target: same scores, fewer steps.
    """

    metrics = ("exact_match",)
    join_fraction = 4  # waiting prompts join once 1/join_fraction of the batch is free (0: one batch at a time)

    def __init__(self, items: Sequence[GenerateItem], tokenizer, *, name: str = "generate", batch_size: int = 32,
                 max_new_tokens: int = 32, autocast: bool = True):
        self.name, self.batch_size, self.autocast = name, batch_size, autocast
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.pad_id = _pad_id(tokenizer)
        encoder = LmEvalEncoder(tokenizer)
        self.prompts = [encoder.encode(item.prompt) for item in items]
        self.stops = [item.stop for item in items]
        self.targets = [item.target for item in items]

    def generations(self, model, which: Sequence[int], *, scoring: bool = False) -> list[str]:
        """The greedy continuation of each prompt in `which`, cut at its first stop string. With `scoring`, a row
        also stops as soon as its text can no longer match its target (see `_cannot_match`): its exact_match is
        0 whatever would follow, so only the scores, not the texts, equal those of full decoding."""
        room = max_length(model, self.tokenizer) - self.max_new_tokens
        if room <= 0:
            raise EvalError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt", self.name)
        prompts = {i: self.prompts[i][-room:] for i in which}
        order = sorted(prompts, key=lambda i: -len(prompts[i]))
        with inference(model, self.autocast) as run:
            fwd = _Forward.of(model)
            prefix = _Prefix.shared(model, [prompts[i] for i in order], len(prompts[order[-1]]) - 1, run.device,
                                    fwd) if order else None
            out = self._decode(model, order, prompts, _eos_ids(model, self.tokenizer), prefix, run.device, fwd,
                               scoring)
        return [out[i] for i in which]

    def _decode(self, model, order: list[int], prompts: dict[int, list[int]], eos: set[int],
                prefix: _Prefix | None, device: torch.device, fwd: _Forward, scoring: bool) -> dict[int, str]:
        pending, out = list(reversed(order)), {}  # a stack: the longest prompt on top
        generated: dict[int, list[int]] = {i: [] for i in order}
        running: _Decoding | None = None
        joins = fwd.plain_cache and self.join_fraction > 0  # else: one batch at a time
        join_at = max(1, self.batch_size // self.join_fraction) if joins else self.batch_size
        while pending or running is not None:
            free = self.batch_size - (len(running) if running is not None else 0)
            if pending and (running is None or free >= join_at):
                group = [pending.pop()]
                while pending and len(group) < free and 2 * len(prompts[pending[-1]]) >= len(prompts[group[0]]):
                    group.append(pending.pop())
                joined = _Decoding(model, group, [prompts[i] for i in group], self.pad_id, device, fwd, prefix)
                if running is None:
                    running = joined
                else:
                    running.join(joined)
            _check_finite(running.logits, self.name)
            tokens = running.logits.argmax(dim=-1)
            still = []
            for k, (item, token) in enumerate(zip(running.items, tokens.tolist(), strict=True)):
                if self._finished(item, generated[item], token, eos, scoring):
                    text = self.tokenizer.decode(generated[item], skip_special_tokens=True)
                    out[item] = _cut(text, self.stops[item])
                else:
                    still.append(k)
            if not still:
                running = None
                continue
            if len(still) < len(running):
                running.keep(still)
                tokens = tokens[torch.tensor(still, device=device)]
            running.step(model, tokens)
        return out

    def _finished(self, item: int, generated: list[int], token: int, eos: set[int], scoring: bool) -> bool:
        """Append `token` unless it is eos; True once the row must stop (with `scoring`, also once it cannot
        match its target)."""
        if token in eos:
            return True
        generated.append(token)
        if len(generated) >= self.max_new_tokens:
            return True
        stops = self.stops[item]
        if stops or scoring:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            return any(stop in text for stop in stops) or (scoring and _cannot_match(text, self.targets[item], stops))
        return False

    def score(self, model, which: Sequence[int]) -> list[dict[str, float]]:
        """Per item: exact_match (1.0 or 0.0)."""
        return [{"exact_match": float(text.strip() == self.targets[i].strip())}
                for i, text in zip(which, self.generations(model, which, scoring=True), strict=True)]


UNSETTLED_CHARS = 4  # the tail of a decoded text that more tokens may still change: an incomplete UTF-8
                     # character (U+FFFD until completed), clean-up of the space before punctuation ("hi ." -> "hi.")


def _cannot_match(text: str, target: str, stops: Sequence[str]) -> bool:
    """Whether a row whose decoded text so far is `text` (no stop string in it yet) can no longer end with
    exact_match 1. Its final output starts with `settled`: `text` less the tail that more tokens may change
    or that a stop string beginning inside it may cut. The stripped output then starts with `settled` stripped
    of surrounding whitespace, so that must begin the stripped target."""
    unsettled = UNSETTLED_CHARS + max((len(stop) for stop in stops), default=1) - 1
    settled = text[:max(0, len(text) - unsettled)].strip()
    return bool(settled) and not target.strip().startswith(settled)


def _cut(text: str, stops: Sequence[str]) -> str:
    """lm-eval's stop handling: keep what precedes the first occurrence of any stop string."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(source)
    return ids


class PerplexityScorer:
    """neg_nll: minus the mean token negative log-likelihood of each text (higher is better). The first
    token is predicted from the BOS (else EOS) token, as in lm-eval's loglikelihood_rolling; a text longer
    than the model's context is an error (no rolling windows)."""

    metrics = ("neg_nll",)

    def __init__(self, items: Sequence[PerplexityItem], tokenizer, *, name: str = "perplexity",
                 batch_size: int = 32, autocast: bool = True):
        self.name, self.batch_size, self.autocast, self.tokenizer = name, batch_size, autocast, tokenizer
        self.pad_id = _pad_id(tokenizer)
        encoder = LmEvalEncoder(tokenizer)
        self.ids = [item.id for item in items]
        self.sequences = [self._with_prefix(encoder, item) for item in items]

    def _with_prefix(self, encoder: LmEvalEncoder, item: PerplexityItem) -> list[int]:
        ids = encoder.encode(item.text)
        if not ids:
            raise EvalError(f"item {item.id!r} tokenizes to nothing", self.name)
        return ids if ids[0] == encoder.prefix_token_id and len(ids) > 1 else [encoder.prefix_token_id, *ids]

    def nlls(self, model, which: Sequence[int]) -> list[tuple[float, int]]:
        """(summed token NLL, number of scored tokens) for each text in `which`."""
        limit = max_length(model, self.tokenizer)
        for i in which:
            if len(self.sequences[i]) > limit:
                raise EvalError(f"text {self.ids[i]!r} has {len(self.sequences[i])} tokens, more than the model's "
                                f"{limit}", self.name)
        order = sorted(which, key=lambda i: -len(self.sequences[i]))
        out: dict[int, tuple[float, int]] = {}
        with inference(model, self.autocast) as run:
            device = run.device
            for batch in _batches(order, self.batch_size, lambda i: len(self.sequences[i])):
                seqs = [self.sequences[i] for i in batch]
                ids = _pad_right(seqs, self.pad_id, device)
                valid = (torch.arange(1, ids.shape[1], device=device)[None, :]
                         < torch.tensor([len(s) for s in seqs], device=device)[:, None])
                logits = model(input_ids=ids[:, :-1]).logits
                logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                sums = -(logprobs * valid).sum(dim=1)
                _check_finite(sums, self.name)
                out.update(zip(batch, zip(sums.tolist(), valid.sum(dim=1).tolist(), strict=True), strict=True))
        return [out[i] for i in which]

    def score(self, model, which: Sequence[int]) -> list[dict[str, float]]:
        """Per item: neg_nll = -(mean token NLL)."""
        return [{"neg_nll": -total / count} for total, count in self.nlls(model, which)]


Scorer = MultipleChoiceScorer | GenerateScorer | PerplexityScorer


def make_scorer(kind: str, items: Sequence[Item], tokenizer, *, name: str, batch_size: int = 32,
                max_new_tokens: int = 32, autocast: bool = True, chat_template: bool = False,
                system: str | None = None) -> Scorer:
    """The scorer for a local task kind, with its items tokenized once (through the tokenizer's chat template
    first when `chat_template`, see chat_items)."""
    common = {"name": name, "batch_size": batch_size, "autocast": autocast}
    if chat_template:
        items = chat_items(items, tokenizer, system, name)
    if kind == "multiple_choice":
        return MultipleChoiceScorer(items, tokenizer, **common)
    if kind == "generate":
        return GenerateScorer(items, tokenizer, max_new_tokens=max_new_tokens, **common)
    if kind == "perplexity":
        return PerplexityScorer(items, tokenizer, **common)
    raise EvalError(f"no native scorer for kind {kind!r}", name)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


__all__ = ["GenerateScorer", "LmEvalEncoder", "MultipleChoiceScorer", "PerplexityScorer", "Runtime", "Scorer",
           "chat_items", "chat_prompt", "inference", "make_scorer", "max_length"]
