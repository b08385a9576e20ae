"""Chat templates: native scoring and lm-eval's apply_chat_template agree item by item, for multiple choice and
generation, with and without a system prompt; task specs carry the option to both."""

import contextlib
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import EvalError
from evaluators.native import GenerateScorer, MultipleChoiceScorer, chat_items, chat_prompt, make_scorer
from evaluators.suite import Suite
from evaluators.tasks import TaskSpec, parse_evaluation_block, parse_row
from scripts.bench_eval import write_gen_task, write_task
from test_eval_native import gen_rows, mc_rows

# ChatML-like over the char tokenizer's specials: a turn is "<s>ROLE\nCONTENT</s>\n"; a default system turn
# when none is given (as SmolLM2's template does). The rendered chat starts with the BOS text "<s>".
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<s>system\nYou are a tiny model.</s>\n{% endif %}"
            "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def load(path):
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok


def lm_eval_run(model, tok, folder, task, system=None):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dict = TaskManager(include_path=str(folder), include_defaults=False).load([task])
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        out = evaluator.evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=8), task_dict=task_dict,
                                 bootstrap_iters=0, log_samples=True, apply_chat_template=True,
                                 system_instruction=system, fewshot_as_multiturn=True)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_chat_prompt_renders_like_lm_eval(zoo):
    _, tok = load(zoo["base"])
    assert chat_prompt(tok, "1+1=") == "<s>system\nYou are a tiny model.</s>\n<s>user\n1+1=</s>\n<s>assistant\n"
    assert chat_prompt(tok, "q", system="Be brief.") == "<s>system\nBe brief.</s>\n<s>user\nq</s>\n<s>assistant\n"


@pytest.mark.parametrize("system", [None, "Answer with the number only."])
def test_multiple_choice_with_chat_template_matches_lm_eval(zoo, tmp_path, system):
    model, tok = load(zoo["ft_add"])
    rows = [r for r in mc_rows(24) if r["query"]]  # lm-eval renders an empty query as a chat too; keep it simple
    write_task(rows, tmp_path, task="chat_mc", chat=True)
    items = chat_items([parse_row("multiple_choice", r, "x") for r in rows], tok, system, "chat_mc")
    assert all(item.query.startswith("<s>system\n") and item.query.endswith("<s>assistant\n") for item in items)
    scorer = MultipleChoiceScorer(items, tok, batch_size=8)
    which = list(range(len(rows)))
    native_lls, scores = scorer.loglikelihoods(model, which), scorer.score(model, which)
    samples = lm_eval_run(model, tok, tmp_path, "chat_mc", system)
    for got, sample in zip(native_lls, samples, strict=True):
        assert got == pytest.approx([r[0] for r in sample["filtered_resps"]], abs=1e-4)
    assert [s["acc"] for s in scores] == [s["acc"] for s in samples]
    assert [s["acc_norm"] for s in scores] == [s["acc_norm"] for s in samples]
    plain = MultipleChoiceScorer([parse_row("multiple_choice", r, "x") for r in rows], tok).loglikelihoods(model, which)
    assert native_lls[0] != pytest.approx(plain[0], abs=1e-3)  # the template does change what is scored


@pytest.mark.parametrize("system", [None, "Reverse the word."])
def test_generate_with_chat_template_matches_lm_eval(zoo, tmp_path, system):
    model, tok = load(zoo["ft_reverse"])
    rows = [dict(r, stop=["\n"]) for r in gen_rows(14)]
    write_gen_task(rows, tmp_path, task="chat_gen", max_new_tokens=10)
    items = chat_items([parse_row("generate", r, "x") for r in rows], tok, system, "chat_gen")
    outputs = GenerateScorer(items, tok, batch_size=4, max_new_tokens=10).generations(model, list(range(len(rows))))
    samples = lm_eval_run(model, tok, tmp_path, "chat_gen", system)
    assert outputs == [s["filtered_resps"][0] for s in samples]
    assert any(outputs)


def test_task_option_reaches_native_and_lm_eval_alike(zoo, tmp_path):
    model, tok = load(zoo["ft_add"])
    rows = [r for r in mc_rows(16) if r["query"]]
    write_task(rows, tmp_path, task="chat_mc", chat=True)
    (tmp_path / "mc.jsonl").write_text("".join(line for line in (tmp_path / "chat_mc.jsonl").open()))
    chat = {"chat_template": True, "system": "Add."}
    evaluation = parse_evaluation_block({"tasks": [
        {"name": "native", "kind": "multiple_choice", "path": "mc.jsonl", "metric": "acc_norm", **chat},
        {"name": "lm", "kind": "lm_eval", "task": "chat_mc", "include_path": ".", "metric": "acc_norm", **chat},
        {"name": "plain", "kind": "multiple_choice", "path": "mc.jsonl", "metric": "acc_norm"}]}, base_dir=tmp_path)
    assert evaluation.tasks[0].chat_template and evaluation.tasks[0].system == "Add."
    result = Suite.from_config(evaluation, tok, batch_size=8).evaluate(model, split="all")
    assert result.task("native").per_item == result.task("lm").per_item
    assert result.task("native").n == len(rows)


def test_chat_template_errors(zoo, tmp_path):
    with pytest.raises(EvalError, match="needs `chat_template: true`"):
        TaskSpec.from_dict({"kind": "generate", "path": "g.jsonl", "system": "hi"})
    with pytest.raises(EvalError, match="perplexity"):
        TaskSpec.from_dict({"kind": "perplexity", "path": "p.jsonl", "chat_template": True})
    with pytest.raises(EvalError, match="true or false"):
        TaskSpec.from_dict({"kind": "generate", "path": "g.jsonl", "chat_template": "yes"})
    plain_tok = AutoTokenizer.from_pretrained(zoo["base"])  # the char tokenizer has no template of its own
    items = [parse_row("generate", {"prompt": "1+1=", "target": "2"}, "x")]
    with pytest.raises(EvalError, match="no chat template"):
        make_scorer("generate", items, plain_tok, name="g", chat_template=True)
    _, tok = load(zoo["base"])
    with pytest.raises(EvalError, match="only whitespace"):
        chat_items([parse_row("multiple_choice", {"query": "q", "choices": [" a", " "], "gold": 0}, "x")], tok, None, "m")
