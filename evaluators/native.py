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

    @classmethod
    def of(cls, model) -> _Forward:
        params = inspect.signature(model.forward).parameters
        return cls("cache" if "cache" in params else "past_key_values", "logits_to_keep" in params,
                   "position_ids" in params, str(getattr(model.config, "_attn_implementation", None) or "eager"))

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
    one forward per `batch_size` items, the LM head applied only at rows that predict a choice token.
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
            for batch in _batches(rows, self.batch_size, lambda row: len(row[1].tokens)):
                scored = self._score_batch(model, [pack for _, pack, _ in batch], run.device, run.dtype, fwd)
                for (i, _, choices), lls in zip(batch, scored, strict=True):
                    for choice, value in zip(choices, lls, strict=True):
                        out[i][choice] = value
        return [out[i] for i in which]

    def _fitted(self, i: int, limit: int) -> list[tuple[_Packed, tuple[int, ...]]]:
        if (i, limit) not in self._fit_cache:
            self._fit_cache[(i, limit)] = _fit(self.items[i], limit, self.name)
        return self._fit_cache[(i, limit)]

    def _score_batch(self, model, packs: list[_Packed], device: torch.device, dtype: torch.dtype,
                     fwd: _Forward) -> list[list[float]]:
        width = max(len(p.tokens) for p in packs)
        input_ids = torch.full((len(packs), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(packs), width), dtype=torch.long)
        allowed = torch.zeros((len(packs), width, width), dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        for b, p in enumerate(packs):
            n, ctx = len(p.tokens), p.context_len
            input_ids[b, :n] = p.tokens
            positions[b, :n] = p.positions
            allowed[b, :n, :n] = causal[:n, :n]
            allowed[b, ctx:n, ctx:n] = p.trie_mask
        allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no empty softmax
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        offsets = torch.tensor([0, *(p.n_choices for p in packs)]).cumsum(dim=0)
        batch = torch.cat([torch.full_like(p.rows, b) for b, p in enumerate(packs)]).to(device)
        rows = torch.cat([p.rows for p in packs]).to(device)
        targets = torch.cat([p.targets for p in packs]).to(device)
        owner = torch.cat([p.choices + offsets[b] for b, p in enumerate(packs)]).to(device)
        extra = {}
        if fwd.logits_to_keep:  # the LM head runs only on rows that predict a scored token
            keep = torch.unique(rows)
            extra, rows = {"logits_to_keep": keep}, torch.searchsorted(keep, rows)
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


def _prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device, fwd: _Forward):
    """Left-padded forward over `prompts`: (last-position logits [B, V], KV cache, attention mask [B, width])."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **fwd.last_only())
    return out.logits[:, -1, :], _cache_of(out), mask


class GenerateScorer:
    """exact_match of greedy decoding (KV cache, left padding) cut at the first stop string, or eos,
    or `max_new_tokens`, against the target (both stripped of surrounding whitespace)."""

    metrics = ("exact_match",)

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

    def generations(self, model, which: Sequence[int]) -> list[str]:
        """The greedy continuation of each prompt in `which`, cut at its first stop string."""
        order = sorted(which, key=lambda i: -len(self.prompts[i]))
        out: dict[int, str] = {}
        eos = _eos_ids(model, self.tokenizer)
        room = max_length(model, self.tokenizer) - self.max_new_tokens
        if room <= 0:
            raise EvalError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt", self.name)
        with inference(model, self.autocast) as run:
            fwd = _Forward.of(model)
            for batch in _batches(order, self.batch_size, lambda i: len(self.prompts[i])):
                prompts = [self.prompts[i][-room:] for i in batch]
                texts = self._generate(model, prompts, [self.stops[i] for i in batch], eos, run.device, fwd)
                out.update(zip(batch, texts, strict=True))
        return [out[i] for i in which]

    def _generate(self, model, prompts: list[list[int]], stops: list[tuple[str, ...]], eos: set[int],
                  device: torch.device, fwd: _Forward) -> list[str]:
        logits, cache, mask = _prefill(model, prompts, self.pad_id, device, fwd)
        last_pos = mask.sum(dim=1, keepdim=True) - 1
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        while True:
            _check_finite(logits, self.name)
            tokens = logits.argmax(dim=-1)
            still = [k for k, (row, tok) in enumerate(zip(active, tokens.tolist(), strict=True))
                     if not self._finished(generated[row], tok, stops[row], eos)]
            if not still:
                break
            if len(still) < len(active):
                index = torch.tensor(still, device=device)
                cache.batch_select_indices(index)
                tokens, mask, last_pos = tokens[index], mask[index], last_pos[index]
                active = [active[k] for k in still]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            last_pos = last_pos + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_pos,
                           **fwd.with_cache(cache)).logits[:, -1, :]
        return [_cut(self.tokenizer.decode(g, skip_special_tokens=True), s)
                for g, s in zip(generated, stops, strict=True)]

    def _finished(self, generated: list[int], token: int, stops: tuple[str, ...], eos: set[int]) -> bool:
        """Append `token` unless it is eos; True once the row must stop."""
        if token in eos:
            return True
        generated.append(token)
        if len(generated) >= self.max_new_tokens:
            return True
        if stops:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            return any(stop in text for stop in stops)
        return False

    def score(self, model, which: Sequence[int]) -> list[dict[str, float]]:
        """Per item: exact_match (1.0 or 0.0)."""
        return [{"exact_match": float(text.strip() == self.targets[i].strip())}
                for i, text in zip(which, self.generations(model, which), strict=True)]


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
