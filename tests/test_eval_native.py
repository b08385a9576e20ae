"""Native scoring is faithful: same per-item log-likelihoods and answers as lm-eval, HF greedy generate, direct NLL."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import NonFiniteError
from evaluators.native import GenerateScorer, LmEvalEncoder, MultipleChoiceScorer, PerplexityScorer
from evaluators.tasks import parse_row
from scripts.bench_eval import write_task


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def mc_rows(n: int = 40, seed: int = 5) -> list[dict]:
    """Multiple-choice rows covering lm-eval's corner cases: trailing context spaces, shared choice prefixes,
    single-token choices, 2-4 choices, an empty query and a context too long for the model (truncation)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 60), rng.randint(0, 40)
        word = "".join(rng.choice("abcdefg") for _ in range(rng.randint(2, 6)))
        query, choices = [
            (f"{a}+{b}=", [str(a + b), str(a + b + 1), str(a + b + 10), str(a + b - 1)]),
            (f"{a}+{b}= ", [str(a + b), str(a + b + 2)]),
            (f"rev {word} =", [" " + word[::-1], " " + word, " " + word[::-1] + "x"]),
            (f"up {word} = ", [word.upper(), "x", word]),
        ][i % 4]
        gold = rng.randrange(len(choices))
        rows.append({"id": f"r{i}", "query": query, "choices": choices, "gold": gold})
    rows.append({"id": "empty", "query": "", "choices": ["1+1=2", "1+1=3"], "gold": 0})
    rows.append({"id": "long", "query": "rev abc = cba; " * 20 + "1+1=", "choices": ["2", "3" * 30, "11"],
                 "gold": 0})
    return rows


PREAMBLE = "Solve each task; answer with the result only. "  # a prefix every item shares (47 tokens)


def with_preamble(rows, key):
    return [dict(r, **{key: PREAMBLE + r[key]}) for r in rows]


def flat(nested):
    return [x for row in nested for x in row]


def mc_items(rows):
    return [parse_row("multiple_choice", r, f"row{i}") for i, r in enumerate(rows)]


def run_lm_eval(model, tok, rows, folder):
    """Per-doc log-likelihoods, acc and acc_norm from lm-eval itself, on a local task over the same rows."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    write_task(rows, folder, task="faith_mc")
    task_dict = TaskManager(include_path=str(folder), include_defaults=False).load(["faith_mc"])
    out = evaluator.evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=8), task_dict=task_dict,
                             bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"]["faith_mc"], key=lambda s: s["doc_id"])
    return ([[r[0] for r in s["filtered_resps"]] for s in samples], [s["acc"] for s in samples],
            [s["acc_norm"] for s in samples], out["results"]["faith_mc"])


@pytest.mark.parametrize("name,preamble", [("ft_add", False), ("qwen2", False), ("ft_add", True)])
def test_multiple_choice_matches_lm_eval(zoo, tmp_path, name, preamble):
    model, tok = load(zoo[name])
    rows = with_preamble(mc_rows(), "query") if preamble else mc_rows()
    scorer = MultipleChoiceScorer(mc_items(rows), tok, batch_size=8)
    which = list(range(len(rows)))
    native_lls = scorer.loglikelihoods(model, which)
    scores = scorer.score(model, which)
    ref_lls, ref_acc, ref_acc_norm, ref_summary = run_lm_eval(model, tok, rows, tmp_path)
    for got, want in zip(native_lls, ref_lls, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert [s["acc"] for s in scores] == ref_acc
    assert [s["acc_norm"] for s in scores] == ref_acc_norm
    assert sum(s["acc"] for s in scores) / len(rows) == pytest.approx(ref_summary["acc,none"])
    assert sum(s["acc_norm"] for s in scores) / len(rows) == pytest.approx(ref_summary["acc_norm,none"])


def test_encoder_matches_hflm(zoo):
    from lm_eval.models.huggingface import HFLM

    model, tok = load(zoo["base"])
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    enc = LmEvalEncoder(tok)
    for ctx, cont in [("12+3=", "15"), ("12+3= ", "15"), ("a  ", " b"), ("<s>x", "y")]:
        assert enc.encode_pair(ctx, cont) == lm._encode_pair(ctx, cont)
    assert enc.encode("<s>abc") == lm.tok_encode("<s>abc") and enc.prefix_token_id == lm.prefix_token_id


def test_batching_and_subsets_do_not_change_scores(zoo):
    model, tok = load(zoo["ft_add"])
    items = mc_items(mc_rows(24, seed=9))
    full = MultipleChoiceScorer(items, tok, batch_size=64).loglikelihoods(model, list(range(24)))
    one = MultipleChoiceScorer(items, tok, batch_size=1)
    subset = [17, 3, 9]
    assert flat(one.loglikelihoods(model, subset)) == pytest.approx(flat(full[i] for i in subset), abs=1e-5)


def test_perplexity_matches_direct_torch(zoo):
    model, tok = load(zoo["ft_reverse"])
    texts = ["rev abc = cba", "12+30=42", "x", "the quick brown fox " * 5]
    items = [parse_row("perplexity", {"text": t}, "x") for t in texts]
    scorer = PerplexityScorer(items, tok, batch_size=3)
    got = scorer.score(model, [0, 1, 2, 3])
    for text, scores in zip(texts, got, strict=True):
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(text)])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = F.cross_entropy(logits, ids[0, 1:]).item()
        assert scores["neg_nll"] == pytest.approx(-nll, abs=1e-5)


def gen_rows(n=12, seed=3):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8)))
        rows.append({"prompt": f"rev {word} =" if i % 3 else f"{i}+{2 * i}=", "target": " " + word[::-1],
                     "stop": [["\n"], ["a", "b"], []][i % 3]})
    return rows


def hf_greedy(model, tok, item, max_new_tokens: int) -> str:
    """What HF's greedy generate gives on the item's prompt alone, cut at its first stop string."""
    ids = tok(item.prompt, return_tensors="pt")
    with torch.no_grad():
        full = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    want = tok.decode(full[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    for stop in item.stop:
        want = want.split(stop)[0]
    return want


def test_generate_matches_hf_greedy_generate(zoo):
    model, tok = load(zoo["ft_reverse"])
    rows = gen_rows()
    items = [parse_row("generate", r, "x") for r in rows]
    scorer = GenerateScorer(items, tok, batch_size=8, max_new_tokens=10)
    which = list(range(len(rows)))
    outputs = scorer.generations(model, which)
    for item, got in zip(items, outputs, strict=True):
        assert got == hf_greedy(model, tok, item, 10), item
    assert GenerateScorer(items, tok, batch_size=1, max_new_tokens=10).generations(model, which) == outputs
    scores = scorer.score(model, which)
    assert [s["exact_match"] for s in scores] == [float(o.strip() == r["target"].strip())
                                                  for o, r in zip(outputs, rows, strict=True)]


def test_shared_prefix_is_computed_once(zoo):
    """Rows that share a prefix feed it once (batch 1), then only their own tokens; scores do not move."""
    model, tok = load(zoo["ft_add"])
    shapes = []
    model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    rows = with_preamble(mc_rows(12), "query")
    lls = MultipleChoiceScorer(mc_items(rows), tok, batch_size=4).loglikelihoods(model, range(12))
    assert shapes[0] == (1, len(PREAMBLE)) and len(shapes) == 4  # the prefix, then 3 batches of 4 items
    assert max(width for _, width in shapes[1:]) < max(len(tok.encode(r["query"])) for r in rows)
    one = MultipleChoiceScorer(mc_items(rows), tok, batch_size=4)
    assert flat(one.loglikelihoods(model, [5])) == pytest.approx(flat([lls[5]]), abs=1e-5)  # alone: no prefix
    shapes.clear()
    items = [parse_row("generate", r, "x") for r in with_preamble(gen_rows(6), "prompt")]
    GenerateScorer(items, tok, max_new_tokens=4).generations(model, range(6))
    assert shapes[0] == (1, len(PREAMBLE)) and shapes[1][1] < len(items[0].prompt)


@pytest.mark.parametrize("preamble", [False, True])
def test_generate_rows_stop_alone_and_new_rows_join(zoo, monkeypatch, preamble):
    """Continuous batching: a row that stops leaves, waiting prompts join the running batch; every output
    equals HF's greedy generate on that prompt alone."""
    from evaluators import native

    model, tok = load(zoo["ft_reverse"])
    joins = []
    join = native._Decoding.join
    monkeypatch.setattr(native._Decoding, "join", lambda self, other: (joins.append(len(other)), join(self, other)))
    rows = [dict(r, stop=[["="], [" = ="], ["\n"]][i % 3]) for i, r in enumerate(gen_rows(16, seed=8))]
    rows = with_preamble(rows, "prompt") if preamble else rows  # stops after 1, 3 and 8 tokens: rows leave early
    items = [parse_row("generate", r, "x") for r in rows]
    outputs = GenerateScorer(items, tok, batch_size=4, max_new_tokens=8).generations(model, range(16))
    assert joins  # rows joined a running batch
    for item, got in zip(items, outputs, strict=True):
        assert got == hf_greedy(model, tok, item, 8), item


@pytest.mark.parametrize("model_name", ["base", "ft_reverse"])
def test_scoring_stops_rows_that_cannot_match_with_the_same_scores(zoo, model_name):
    """score() stops a row once its text can no longer equal its target: the texts are cut short, the scores are
    those of full decoding, on targets that match, diverge early, diverge late or run past the output."""
    model, tok = load(zoo[model_name])
    rows = gen_rows(24, seed=11)
    full = GenerateScorer([parse_row("generate", r, "x") for r in rows], tok, max_new_tokens=12).generations(
        model, range(24))
    for i, (row, out) in enumerate(zip(rows, full, strict=True)):
        row["target"] = [out, "  " + out.strip() + " ", out[:1] + "#" + out[2:], out[:-1] + "#", out + "zz", "#"][i % 6]
    items = [parse_row("generate", r, "x") for r in rows]
    row_steps = []
    model.register_forward_pre_hook(lambda m, a, k: row_steps.append(k["input_ids"].shape[0])
                                    if k["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    scorer = GenerateScorer(items, tok, max_new_tokens=12)
    assert scorer.generations(model, range(24)) == full
    decoded, row_steps[:] = sum(row_steps), []
    scores = [s["exact_match"] for s in scorer.score(model, range(24))]
    assert scores == [float(o.strip() == r["target"].strip()) for o, r in zip(full, rows, strict=True)]
    assert 0 < sum(scores) < 24 and sum(row_steps) < decoded


def test_cannot_match_leaves_the_tail_a_stop_or_more_tokens_may_change():
    from evaluators.native import _cannot_match

    assert _cannot_match("  wxyz12345", "abc", []) and not _cannot_match("  abc12", "abc", [])
    assert not _cannot_match("   \n", "abc", []) and not _cannot_match("abcdefgh ", "abcdefgh", [])
    assert _cannot_match("abcdefgh xyz   ", "abcdefgh", [])     # more than the target: no stop can cut it away
    assert not _cannot_match("ab<<<<<<", "ab", ["<<<<<<<"])       # a longer stop may yet begin in the tail
    assert _cannot_match("  ab cd", " ab", []) is False and _cannot_match("  xb cdefg", " ab", [])


def test_generate_exact_match_on_a_model_that_knows_the_answer(zoo):
    model, tok = load(zoo["ft_add"])
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (10, 20), (3, 4)]]
    outs = GenerateScorer([parse_row("generate", {"prompt": p, "target": ""}, "x") for p in prompts], tok,
                          max_new_tokens=6).generations(model, [0, 1, 2])
    items = [parse_row("generate", {"prompt": p, "target": o}, "x") for p, o in zip(prompts, outs, strict=True)]
    assert GenerateScorer(items, tok, max_new_tokens=6).score(model, [0, 1, 2]) == [{"exact_match": 1.0}] * 3


def test_in_place_weight_changes_are_seen(zoo):
    model, tok = load(zoo["base"])
    items = mc_items(mc_rows(8))
    scorer = MultipleChoiceScorer(items, tok)
    ppl = PerplexityScorer([parse_row("perplexity", {"text": "rev abc = cba"}, "x")], tok)
    before, ppl_before = scorer.loglikelihoods(model, range(8)), ppl.score(model, [0])
    other, _ = load(zoo["ft_add"])
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    after = flat(scorer.loglikelihoods(model, range(8)))
    assert after != pytest.approx(flat(before), abs=1e-3)
    assert after == pytest.approx(flat(scorer.loglikelihoods(other, range(8))), abs=1e-6)
    assert ppl.score(model, [0]) != ppl_before


def test_non_finite_weights_raise(zoo):
    model, tok = load(zoo["base"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(math.nan)
    scorers = [MultipleChoiceScorer(mc_items(mc_rows(4)), tok),
               PerplexityScorer([parse_row("perplexity", {"text": "abc"}, "x")], tok),
               GenerateScorer([parse_row("generate", {"prompt": "1+1=", "target": "2"}, "x")], tok)]
    for scorer in scorers:
        with pytest.raises(NonFiniteError):
            scorer.score(model, [0])
