"""Real specialists of SmolLM2-135M-Instruct for mergesearch: generated skill data, short CPU fine-tunes, the
local JSONL evaluation tasks and ready-to-run study/soup YAMLs, all cached outside the repo. Never run in CI.

    python scripts/real_model.py                      # once: the base model (GGUF -> HF folder)
    python scripts/real_specialists.py data           # training texts + task JSONL (seconds)
    python scripts/real_specialists.py baseline       # base model scores on the tasks (a few minutes)
    python scripts/real_specialists.py train math     # one specialist (see SKILLS for steps; ~20-40 min on 2 cores)
    python scripts/real_specialists.py train json
    python scripts/real_specialists.py train french
    python scripts/real_specialists.py studies        # <cache>/studies/smollm2_{search,soup}.yaml (absolute paths)
    python scripts/real_specialists.py all            # everything above, in order, skipping what is cached

    mergesearch search ~/.cache/mergesearch/smollm2/studies/smollm2_search.yaml
    mergesearch soup   ~/.cache/mergesearch/smollm2/studies/smollm2_soup.yaml

Three skills, each a templated generator (seeded; evaluation items never appear in the training texts):
  math    arithmetic word problems (2-digit add / subtract)     task: multiple_choice (gold, +-1, +-10)
  json    structured output: a sentence -> a 3-field JSON object task: generate, exact match
  french  English -> French noun phrases (gender, plural, colour agreement)  task: generate, exact match

Every specialist is a full fine-tune (nothing frozen) of the base with AdamW at a constant learning rate after
a short warm-up, loss on the answer tokens only, float32, deterministic (fixed seeds, fixed data order).
`math` also saves `checkpoint-N/` folders for the soup. Layout of the cache (`$MERGESEARCH_CACHE/smollm2`):

    base/                         the converted model (scripts/real_model.py)
    data/{skill}_train.jsonl      training pairs {prompt, answer}
    tasks/{skill}.jsonl           160 evaluation items; the first 48 are also tasks/{skill}_search.jsonl (a search
                                  scores every candidate on those)
    tasks/{skill}_test.jsonl      240 held-out items (never in training nor in the search items): the final
                                  comparison picks the winner on one half and reports every row on the other
    specialists/{skill}/          the fine-tunes (517 MB each) + train_log.json
    checkpoints/math/checkpoint-N intermediate checkpoints of the math run (the soup's ingredients)
    studies/*.yaml                generated studies; runs/ their run folders
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402

# ----------------------------------------------------------------------------------------------- generators
NAMES = ["Tom", "Ana", "Lee", "Sam", "Mia", "Raj", "Eva", "Kim", "Omar", "Lena", "Ivan", "Zoe", "Noah",
         "Ella", "Yuki", "Paul", "Nina", "Hugo", "Sara", "Liam", "Maya", "Finn", "Aria", "Leo"]
THINGS = ["apples", "books", "coins", "stamps", "shells", "cards", "marbles", "pencils", "stickers", "cookies",
          "buttons", "flowers", "rocks", "tickets", "candles", "ribbons"]
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna", "Quito",
          "Seoul", "Lagos", "Delhi", "Prague", "Sydney", "Boston", "Denver", "Milan", "Porto"]
JOBS = ["teacher", "doctor", "baker", "pilot", "nurse", "farmer", "writer", "chef", "lawyer", "painter",
        "engineer", "dentist", "plumber", "singer", "driver", "artist"]

# (english, french, gender[, french plural[, english plural]]): regular plurals add -s
NOUNS = [("cat", "chat", "m"), ("dog", "chien", "m"), ("house", "maison", "f"), ("car", "voiture", "f"),
         ("book", "livre", "m"), ("table", "table", "f"), ("flower", "fleur", "f"), ("bird", "oiseau", "m", "oiseaux"),
         ("door", "porte", "f"), ("hat", "chapeau", "m", "chapeaux"), ("chair", "chaise", "f"), ("ball", "balle", "f"),
         ("horse", "cheval", "m", "chevaux"), ("shirt", "chemise", "f"), ("boat", "bateau", "m", "bateaux"),
         ("apple", "pomme", "f"), ("tree", "arbre", "m"), ("bag", "sac", "m"), ("cup", "tasse", "f"),
         ("bike", "vélo", "m"), ("pen", "stylo", "m"), ("window", "fenêtre", "f"), ("box", "boîte", "f", None, "boxes"),
         ("glass", "verre", "m", None, "glasses"), ("plate", "assiette", "f"), ("coat", "manteau", "m", "manteaux"),
         ("shoe", "chaussure", "f"), ("mouse", "souris", "f", "souris", "mice"), ("key", "clé", "f"),
         ("train", "train", "m"), ("bottle", "bouteille", "f"), ("lamp", "lampe", "f"), ("wall", "mur", "m"),
         ("bed", "lit", "m"), ("plane", "avion", "m")]
# (english, masculine, feminine, goes before the noun); plurals add -s unless the form ends in s/x
COLOURS = [("red", "rouge", "rouge", False), ("white", "blanc", "blanche", False), ("black", "noir", "noire", False),
           ("green", "vert", "verte", False), ("blue", "bleu", "bleue", False), ("grey", "gris", "grise", False),
           ("yellow", "jaune", "jaune", False), ("pink", "rose", "rose", False),
           ("purple", "violet", "violette", False), ("small", "petit", "petite", True),
           ("big", "grand", "grande", True), ("pretty", "joli", "jolie", True)]
ARTICLES = {("the", "m", False): "le", ("the", "f", False): "la", ("the", "m", True): "les",
            ("the", "f", True): "les", ("a", "m", False): "un", ("a", "f", False): "une",
            ("some", "m", True): "des", ("some", "f", True): "des", ("two", "m", True): "deux",
            ("two", "f", True): "deux", ("three", "m", True): "trois", ("three", "f", True): "trois"}


def math_example(rng: random.Random) -> tuple[str, int]:
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        template = rng.choice([
            "{w} has {a} {t} and gets {b} more. How many {t} does {w} have now?",
            "{w} had {a} {t}. A friend gave {w} {b} more. How many {t} does {w} have?",
            "There are {a} {t} in a box and {b} in a bag. How many {t} are there in total?"])
        answer = a + b
    else:
        a = rng.randint(30, 99)
        b = rng.randint(10, a - 5)
        template = rng.choice([
            "{w} has {a} {t} and gives away {b}. How many {t} does {w} have left?",
            "{w} had {a} {t} and lost {b} of them. How many {t} does {w} have now?",
            "There were {a} {t} on a shelf. {w} took {b}. How many {t} are on the shelf now?"])
        answer = a - b
    return "Question: " + template.format(w=who, t=what, a=a, b=b) + "\nAnswer:", answer


def math_row(rng: random.Random) -> dict:
    prompt, answer = math_example(rng)
    return {"prompt": prompt, "answer": f" {answer}"}


def math_item(rng: random.Random) -> dict:
    prompt, answer = math_example(rng)
    wrong = [answer + d for d in (-10, -1, 1, 10)]
    rng.shuffle(wrong)
    choices = [f" {answer}"] + [f" {w}" for w in wrong[:3]]
    rng.shuffle(choices)
    return {"query": prompt, "choices": choices, "gold": choices.index(f" {answer}")}


def json_example(rng: random.Random) -> tuple[str, str]:
    name, age, city, job = rng.choice(NAMES), rng.randint(19, 79), rng.choice(CITIES), rng.choice(JOBS)
    template = rng.choice([
        "{n} is {a} years old and works as a {j} in {c}.",
        "{n}, a {j} aged {a}, lives in {c}.",
        "Meet {n} ({a}), a {j} from {c}.",
        "In {c} there is a {j} called {n} who is {a}.",
        "{n} works in {c} as a {j} and turned {a} this year."])
    text = template.format(n=name, a=age, c=city, j=job)
    target = json.dumps({"name": name, "age": age, "job": job, "city": city})
    return f"Text: {text}\nJSON:", target


def generated_row(example, rng: random.Random) -> dict:
    """A training pair of a generate skill: the prompt, the target and a newline."""
    prompt, target = example(rng)
    return {"prompt": prompt, "answer": " " + target + "\n"}


def generated_item(example, rng: random.Random) -> dict:
    """An evaluation item of a generate skill: exact match up to the newline."""
    prompt, target = example(rng)
    return {"prompt": prompt, "target": target, "stop": ["\n"]}


def _plural(word: str) -> str:
    return word if word[-1] in "sx" else word + "s"


def french_example(rng: random.Random) -> tuple[str, str]:
    en_noun, fr_noun, gender, *more = rng.choice(NOUNS)
    fr_plural = more[0] if more and more[0] else _plural(fr_noun)
    en_plural = more[1] if len(more) > 1 else en_noun + "s"
    en_adj, fr_m, fr_f, before = rng.choice(COLOURS)
    det = rng.choice(["the", "the", "a", "some", "two", "three"])
    plural = det in ("some", "two", "three") or (det == "the" and rng.random() < 0.5)
    adj = fr_m if gender == "m" else fr_f
    if plural:
        fr_noun, en_noun, adj = fr_plural, en_plural, _plural(adj)
    article = ARTICLES[(det, gender, plural)]
    if before:                                  # petit / grand / joli go before the noun
        french = f"{article} {adj} {fr_noun}"
    elif article in ("le", "la") and fr_noun[0] in "aeiouh":
        french = f"l'{fr_noun} {adj}"           # l'arbre rouge
    else:
        french = f"{article} {fr_noun} {adj}"
    return f"English: {det} {en_adj} {en_noun}\nFrench:", french


@dataclass(frozen=True)
class Skill:
    name: str
    row: object            # rng -> training pair {prompt, answer}
    item: object           # rng -> evaluation item (task JSONL row)
    kind: str              # task kind
    steps: int
    lr: float = 1e-4
    batch: int = 8
    warmup: int = 10
    checkpoint_every: int = 0
    max_new_tokens: int = 32

    @property
    def n_train(self) -> int:
        """Training pairs written: exactly the ones the run sees (one pass, fixed order)."""
        return self.steps * self.batch


SKILLS = {
    "math": Skill("math", math_row, math_item, "multiple_choice", steps=120, lr=2e-4, checkpoint_every=20),
    "json": Skill("json", partial(generated_row, json_example), partial(generated_item, json_example), "generate",
                  steps=24, lr=1e-4, max_new_tokens=32),
    "french": Skill("french", partial(generated_row, french_example), partial(generated_item, french_example),
                    "generate", steps=96, lr=2e-4, max_new_tokens=12),
}
N_TASK, N_TEST = 160, 240
SEARCH_ITEMS = 48       # of the N_TASK items per skill, the ones a search scores every candidate on
SEARCH_TRIALS = 40


def _key(skill: Skill, row: dict) -> str:
    return row.get("prompt") or row["query"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fresh_items(skill: Skill, rng: random.Random, n: int, exclude: set[str], prefix: str) -> list[dict]:
    items: list[dict] = []
    while len(items) < n:
        item = skill.item(rng)
        if _key(skill, item) not in exclude:
            exclude.add(_key(skill, item))
            items.append({"id": f"{prefix}-{len(items)}", **item})
    return items


def make_data(cache: Path, force: bool | set[str] = False) -> dict:
    """Per skill: training pairs, evaluation items (the study splits them search / held-out) and a separate test
    set that neither the search nor the held-out selection ever sees. No prompt occurs in two of the three."""
    out = {}
    for i, skill in enumerate(SKILLS.values()):
        train_path = cache / "data" / f"{skill.name}_train.jsonl"
        task_path = cache / "tasks" / f"{skill.name}.jsonl"
        test_path = cache / "tasks" / f"{skill.name}_test.jsonl"
        redo = force is True or (isinstance(force, set) and skill.name in force)
        if redo or not (train_path.is_file() and task_path.is_file()):
            seen: set[str] = set()
            items = _fresh_items(skill, random.Random(1000 + i), N_TASK, seen, skill.name)
            train_rng = random.Random(2000 + i)
            rows = []
            while len(rows) < skill.n_train:
                row = skill.row(train_rng)
                if row["prompt"] not in seen:
                    rows.append(row)
            _write_jsonl(train_path, rows)
            _write_jsonl(task_path, items)
        if redo or not test_path.is_file() or len(_read_jsonl(test_path)) != N_TEST:
            exclude = {r["prompt"] for r in _read_jsonl(train_path)}
            exclude |= {_key(skill, r) for r in _read_jsonl(task_path)}
            _write_jsonl(test_path, _fresh_items(skill, random.Random(3000 + i), N_TEST, exclude, f"{skill.name}-test"))
        search_path = cache / "tasks" / f"{skill.name}_search.jsonl"
        _write_jsonl(search_path, _read_jsonl(task_path)[:SEARCH_ITEMS])
        rows, items, test = (_read_jsonl(p) for p in (train_path, task_path, test_path))
        out[skill.name] = {"train": str(train_path), "task": str(task_path), "test": str(test_path),
                           "search": str(search_path),
                           "train_rows": len(rows), "distinct_train_prompts": len({r["prompt"] for r in rows}),
                           "task_items": len(items), "test_items": len(test)}
    return out


# ------------------------------------------------------------------------------------------------- training
def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt+answer (no special tokens, like the evaluators) and where the answer starts."""
    whole = tokenizer.encode(prompt + answer, add_special_tokens=False)
    ctx = tokenizer.encode(prompt, add_special_tokens=False)
    return whole, len(ctx)


def train(cache: Path, name: str, threads: int = 2, steps: int | None = None, log_every: int = 5) -> dict:
    """Fine-tune the base on one skill; saves `specialists/<name>/` (+ checkpoints) and returns its log."""
    import torch
    import torch.nn.functional as F

    skill = SKILLS[name]
    steps = steps or skill.steps
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out_dir = cache / "specialists" / name
    rows = [json.loads(line) for line in (cache / "data" / f"{name}_train.jsonl").read_text().splitlines()]
    model, tok = real_model.load(real_model.base_dir(cache))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=skill.lr, weight_decay=0.0, betas=(0.9, 0.98),
                            fused=True)   # fused: ~3x faster steps than foreach on CPU here
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / skill.warmup))
    encoded = [_encode(tok, r["prompt"], r["answer"]) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    log = {"skill": name, "steps": steps, "batch": skill.batch, "lr": skill.lr, "warmup": skill.warmup,
           "threads": threads, "losses": [], "checkpoints": []}
    start = time.perf_counter()
    for step in range(steps):
        batch = encoded[step * skill.batch:(step + 1) * skill.batch]   # fixed order: deterministic
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (ids, n_ctx) in enumerate(batch):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            labels[r, n_ctx:len(ids)] = torch.tensor(ids[n_ctx:])
        # next-token targets; the LM head only runs where there is a target (the answer tokens)
        targets = labels[:, 1:]
        where = targets != -100
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1][where]
        loss = F.cross_entropy(model.lm_head(hidden).float(), targets[where])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log["losses"].append(round(loss.item(), 4))
        done = step + 1
        if done % log_every == 0 or done == steps:
            elapsed = time.perf_counter() - start
            print(f"[{name}] step {done}/{steps} loss {sum(log['losses'][-log_every:]) / len(log['losses'][-log_every:]):.4f}"
                  f" {elapsed / done:.1f}s/step", flush=True)
        if skill.checkpoint_every and done % skill.checkpoint_every == 0:
            ckpt = cache / "checkpoints" / name / f"checkpoint-{done}"
            _save(model, tok, ckpt)
            log["checkpoints"].append(str(ckpt))
    log["seconds"] = round(time.perf_counter() - start, 1)
    model.eval()
    _save(model, tok, out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def _save(model, tokenizer, path: Path) -> None:
    import os
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(model_dir: Path, cache: Path, split: str = "holdout", threads: int = 2) -> dict:
    """Scores of one model folder on every task's `split` items (search, holdout or all)."""
    import torch

    from evaluators.suite import Suite
    from evaluators.tasks import parse_evaluation_block

    torch.set_num_threads(threads)
    model, tok = real_model.load(model_dir)
    suite = Suite.from_config(parse_evaluation_block({"tasks": task_entries(str(cache)), "seed": 0}), tok,
                              batch_size=16)
    return {t.name: round(t.score, 4) for t in suite.evaluate(model, split).tasks}


def task_entries(root: str, skills=None, file: str = "{skill}_search", holdout: str | None = "{skill}_test"
                 ) -> list[dict]:
    """`evaluation.tasks` entries for the skills under `root` (a path string, `~` allowed): the search items
    (`file`) and, with `holdout`, a separate held-out file (the final comparison's select and report halves)."""
    out = []
    for skill in (SKILLS[s] for s in (skills or SKILLS)):
        entry = {"name": skill.name, "kind": skill.kind, "path": f"{root}/tasks/{file.format(skill=skill.name)}.jsonl"}
        if holdout:
            entry["holdout_path"] = f"{root}/tasks/{holdout.format(skill=skill.name)}.jsonl"
        if skill.kind == "generate":
            entry["max_new_tokens"] = skill.max_new_tokens
        out.append(entry)
    return out


def study_dicts(root: str, runs: str, trials: int = SEARCH_TRIALS, aggregate: str | None = None,
                weight_high: float = 1.5) -> dict[str, dict]:
    """The search study and the soup over `root` (the cache); run folders under `runs`."""
    search = {
        "name": "smollm2-search",
        "output_dir": f"{runs}/smollm2-search",
        # task arithmetic: under TIES' sign election the small JSON task vector is lost (README, SmolLM2 track)
        "merge": {"merge_method": "task_arithmetic", "base_model": f"{root}/base",
                  "models": [{"model": f"{root}/specialists/{s}"} for s in SKILLS], "dtype": "float32"},
        "space": {"granularity": "anchors:2", "params": {"weight": [0.0, weight_high]}},
        "evaluation": {"tasks": task_entries(root), "seed": 0},
        "sampler": {"name": "cmaes", "seed": 0},
        "pruner": {"name": "none"},
        "seed_trials": ["parents", "uniform"],
        "budget": {"trials": trials, "timeout": "12h"},
        "final": {"top_k": 3},
    }
    if aggregate:
        search["objective"] = {"aggregate": aggregate}
    soup = {
        "name": "smollm2-soup",
        "output_dir": f"{runs}/smollm2-soup",
        "checkpoints": [f"{root}/checkpoints/math/checkpoint-*"],
        "evaluation": {"tasks": task_entries(root, skills=["math"], file="{skill}"), "seed": 0},
        "mode": "greedy",
        "strict": True,
        "dtype": "float32",
    }
    return {"smollm2_search": search, "smollm2_soup": soup}


STUDY_HEADER = {
    "smollm2_search": """\
# Task-arithmetic merge search over three real SmolLM2-135M-Instruct specialists (math, json, french), per-layer
# weights (anchors:2 = 2 anchors per model, interpolated over the 30 layers by mergekit's gradient rule: 6 genes)
# in [0, 1.5], CMA-ES, no pruning, objective worst (the default). The search scores candidates on 48 items per task; 240 other items per task
# are held out: the winner is picked on one half of them and every row of the final table reported on the other.
""",
    "smollm2_soup": """\
# Greedy soup (Wortsman et al. 2022) over the checkpoints of the math fine-tune of SmolLM2-135M-Instruct;
# ingredients chosen on the 160 math task items, the table reported on 240 held-out math items.
""",
}


def write_studies(cache: Path, trials: int = SEARCH_TRIALS, folder: Path | None = None, root: str | None = None,
                  runs: str | None = None) -> dict:
    """Write the studies. Default: `<cache>/studies/` with absolute paths (runs in `<cache>/runs/`), ready
    to run. With `folder`/`root`/`runs` (e.g. the repo's studies/ with root `~/.cache/mergesearch/smollm2`)
    it writes the committed templates."""
    import yaml

    folder = folder or cache / "studies"
    root = root or str(cache)
    runs = runs or str(cache / "runs")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in study_dicts(root, runs, trials).items():
        path = folder / f"{name}.yaml"
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
        path.write_text(STUDY_HEADER[name] + "# Generated by `python scripts/real_specialists.py studies`"
                        " (see its docstring for the whole recipe).\n" + text)
        paths[name] = str(path)
    return paths


def make_family(cache: Path) -> Path:
    """`<cache>/family/{base,ft1-math,ft2-json,ft3-french}` symlinks: the layout of `bench_merge.py --models`."""
    family = cache / "family"
    family.mkdir(parents=True, exist_ok=True)
    links = {"base": real_model.base_dir(cache)}
    links.update({f"ft{i}-{s}": cache / "specialists" / s for i, s in enumerate(SKILLS, 1)})
    for name, target in links.items():
        link = family / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return family


# -------------------------------------------------------------------------------------------------- results
def _loop_stats(study) -> dict:
    """Where a trial's time goes. Pruned trials store no merge/eval seconds: the split uses complete ones; the
    gap is the time between one trial's end and the next one's start (sampler ask/tell, storage)."""
    import statistics

    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    dur = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in done}
    inside = [dur[t.number] - t.user_attrs["merge_s"] - t.user_attrs["eval_s"] for t in complete]
    gaps = [(b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(done, done[1:])]
    wall = (done[-1].datetime_complete - done[0].datetime_start).total_seconds()
    med = statistics.median
    return {"trials": len(trials), "complete": len(complete),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials), "loop_wall_s": round(wall, 1),
            "trial_s_median_complete": round(med(dur[t.number] for t in complete), 2),
            "trial_s_median_pruned": round(med([dur[t.number] for t in done if t not in complete] or [0]), 2),
            "merge_s_median": round(med(t.user_attrs["merge_s"] for t in complete), 2),
            "eval_s_median": round(med(t.user_attrs["eval_s"] for t in complete), 2),
            "in_trial_overhead_s_median": round(med(inside), 3),
            "between_trials_s_median": round(med(gaps), 3) if gaps else None,
            "overhead_fraction": round((sum(inside) + sum(gaps)) / wall, 4) if wall else None}


def results(cache: Path, study_path: Path | None = None, soup_dir: Path | None = None) -> dict:
    """What the README's SmolLM2 section reports, read from the runs: the specialists' training, the search's
    final comparison (every row on the report half of the held-out items, the winner's margin and interval) and
    loop statistics, and the soup's tables (JSON, also written to <cache>/results/)."""
    import optuna

    from search.study import load_study

    out: dict = {"specialists": {}, "search": {}, "soup": {}}
    for name in SKILLS:
        log_path = cache / "specialists" / name / "train_log.json"
        if log_path.is_file():
            log = json.loads(log_path.read_text())
            out["specialists"][name] = {**{k: log[k] for k in ("steps", "batch", "lr", "seconds")},
                                        "final_loss": log["losses"][-1]}
    study_path = study_path or cache / "studies" / "smollm2_search.yaml"
    cfg = load_study(study_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
    out["search"] = {"final": study.user_attrs.get("final"), "loop": _loop_stats(study),
                     "references": study.user_attrs.get("references")}
    soup_dir = soup_dir or cache / "runs" / "smollm2-soup"
    for name in ("soup_table.md", "soup_config.yaml"):
        if (soup_dir / name).is_file():
            out["soup"][name] = (soup_dir / name).read_text()
    path = cache / "results" / f"results-{Path(study_path).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


CACHE = real_model.cache_dir()


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["data", "baseline", "train", "eval", "studies", "templates", "results", "all"])
    p.add_argument("names", nargs="*", help="skills (train) or model folders (eval)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="override a skill's steps (train)")
    p.add_argument("--split", default="holdout", choices=["search", "holdout", "all"])
    p.add_argument("--trials", type=int, default=SEARCH_TRIALS, help="search budget written into the study")
    p.add_argument("--force", action="store_true", help="redo cached steps")
    p.add_argument("--study", type=Path, default=None, help="results: another search study YAML")
    p.add_argument("--soup-dir", type=Path, default=None, help="results: another soup run folder")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    cache = args.cache or real_model.cache_dir()
    global CACHE
    CACHE = cache
    if args.command in ("data", "all"):
        force = (set(args.names) or True) if args.force else False   # data --force [skills]: redo those
        print(json.dumps(make_data(cache, force=force), indent=1))
    if args.command == "baseline":
        print(json.dumps({"base": evaluate(real_model.base_dir(cache), cache, args.split, args.threads)}))
    if args.command == "eval":
        for name in args.names:
            folder = cache / "specialists" / name if name in SKILLS else Path(name)
            print(json.dumps({name: evaluate(folder, cache, args.split, args.threads)}), flush=True)
    if args.command in ("train", "all"):
        real_model.ensure_base(cache)
        for name in args.names or list(SKILLS):
            if name not in SKILLS:
                p.error(f"unknown skill {name!r} (one of {', '.join(SKILLS)})")
            if (cache / "specialists" / name / "model.safetensors").is_file() and not args.force:
                print(f"[{name}] cached", flush=True)
                continue
            log = train(cache, name, args.threads, args.steps)
            print(json.dumps({"skill": name, "seconds": log["seconds"], "final_loss": log["losses"][-1]}), flush=True)
    if args.command == "results":
        data = results(cache, args.study, args.soup_dir)
        print(json.dumps({k: v for k, v in data.items() if k != "soup"}, indent=1, default=str))
    if args.command in ("studies", "all"):
        print(json.dumps(write_studies(cache, args.trials), indent=1))
    if args.command in ("studies", "all"):
        print(json.dumps({"bench_family": str(make_family(cache))}))
    if args.command == "templates":   # the committed studies/smollm2_*.yaml (paths under ~/.cache, runs in ../runs)
        repo = Path(__file__).resolve().parents[1]
        print(json.dumps(write_studies(cache, args.trials, folder=repo / "studies",
                                       root="~/.cache/mergesearch/smollm2", runs="../runs"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
