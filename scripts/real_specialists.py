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
    tasks/{skill}.jsonl           evaluation items (the study's holdout fraction splits them search/held-out)
    specialists/{skill}/          the fine-tunes (517 MB each) + train_log.json
    checkpoints/math/checkpoint-N intermediate checkpoints of the math run (the soup's ingredients)
    studies/*.yaml                generated studies; runs/ their run folders
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
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

# (english, french, gender) ; plurals are regular (+s) except where given as a 4th field
NOUNS = [("cat", "chat", "m"), ("dog", "chien", "m"), ("house", "maison", "f"), ("car", "voiture", "f"),
         ("book", "livre", "m"), ("table", "table", "f"), ("flower", "fleur", "f"), ("bird", "oiseau", "m", "oiseaux"),
         ("door", "porte", "f"), ("hat", "chapeau", "m", "chapeaux"), ("chair", "chaise", "f"), ("ball", "balle", "f"),
         ("horse", "cheval", "m", "chevaux"), ("shirt", "chemise", "f"), ("boat", "bateau", "m", "bateaux"),
         ("apple", "pomme", "f"), ("tree", "arbre", "m"), ("bag", "sac", "m"), ("cup", "tasse", "f"),
         ("bike", "vélo", "m")]
# (english, m, f)  ; plural adds -s unless the form already ends in s/x
COLOURS = [("red", "rouge", "rouge"), ("white", "blanc", "blanche"), ("black", "noir", "noire"),
           ("green", "vert", "verte"), ("blue", "bleu", "bleue"), ("grey", "gris", "grise"),
           ("yellow", "jaune", "jaune"), ("small", "petit", "petite"), ("big", "grand", "grande")]
ARTICLES = {("the", "m", False): "le", ("the", "f", False): "la", ("the", "m", True): "les",
            ("the", "f", True): "les", ("a", "m", False): "un", ("a", "f", False): "une",
            ("some", "m", True): "des", ("some", "f", True): "des"}


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


def json_row(rng: random.Random) -> dict:
    prompt, target = json_example(rng)
    return {"prompt": prompt, "answer": " " + target + "\n"}


def json_item(rng: random.Random) -> dict:
    prompt, target = json_example(rng)
    return {"prompt": prompt, "target": target, "stop": ["\n"]}


def _plural(word: str) -> str:
    return word if word[-1] in "sx" else word + "s"


def french_example(rng: random.Random) -> tuple[str, str]:
    noun = rng.choice(NOUNS)
    en_noun, fr_noun, gender = noun[:3]
    en_adj, fr_m, fr_f = rng.choice(COLOURS)
    det = rng.choice(["the", "the", "a", "some"])
    plural = det == "some" or (det == "the" and rng.random() < 0.5)
    adj = fr_m if gender == "m" else fr_f
    if plural:
        fr_noun = noun[3] if len(noun) > 3 else _plural(fr_noun)
        en_noun = en_noun + "s"
        adj = _plural(adj)
    article = ARTICLES[(det, gender, plural)]
    if en_adj in ("small", "big"):          # petit / grand go before the noun
        french = f"{article} {adj} {fr_noun}"
    else:
        french = f"{article} {fr_noun} {adj}"
    if det == "the" and not plural and fr_noun[0] in "aeiouh" and en_adj not in ("small", "big"):
        french = f"l'{fr_noun} {adj}"       # l'arbre rouge
    return f"English: {det} {en_adj} {en_noun}\nFrench:", french


def french_row(rng: random.Random) -> dict:
    prompt, target = french_example(rng)
    return {"prompt": prompt, "answer": " " + target + "\n"}


def french_item(rng: random.Random) -> dict:
    prompt, target = french_example(rng)
    return {"prompt": prompt, "target": target, "stop": ["\n"]}


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


SKILLS = {
    "math": Skill("math", math_row, math_item, "multiple_choice", steps=80, lr=1e-4, checkpoint_every=16),
    "json": Skill("json", json_row, json_item, "generate", steps=40, lr=1e-4, max_new_tokens=32),
    "french": Skill("french", french_row, french_item, "generate", steps=60, lr=1e-4, max_new_tokens=12),
}
N_TRAIN, N_TASK = 4000, 160


def _key(skill: Skill, row: dict) -> str:
    return row.get("prompt") or row["query"]


def make_data(cache: Path, force: bool = False) -> dict:
    """Training pairs and evaluation items per skill; evaluation prompts never occur in the training data."""
    out = {}
    for i, skill in enumerate(SKILLS.values()):
        train_path = cache / "data" / f"{skill.name}_train.jsonl"
        task_path = cache / "tasks" / f"{skill.name}.jsonl"
        if train_path.is_file() and task_path.is_file() and not force:
            out[skill.name] = {"train": str(train_path), "task": str(task_path), "cached": True}
            continue
        rng = random.Random(1000 + i)
        items, seen = [], set()
        while len(items) < N_TASK:
            item = skill.item(rng)
            if _key(skill, item) not in seen:
                seen.add(_key(skill, item))
                items.append({"id": f"{skill.name}-{len(items)}", **item})
        train_rng = random.Random(2000 + i)
        rows = []
        while len(rows) < N_TRAIN:
            row = skill.row(train_rng)
            if row["prompt"] not in seen:
                rows.append(row)
        for path, data in ((train_path, rows), (task_path, items)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        out[skill.name] = {"train": str(train_path), "task": str(task_path), "train_rows": len(rows),
                           "task_items": len(items), "distinct_train_prompts": len({r["prompt"] for r in rows})}
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
def task_specs(cache: Path, limit: int | None = None) -> list[dict]:
    """The study's `evaluation.tasks` entries (absolute paths)."""
    specs = []
    for skill in SKILLS.values():
        spec = {"name": skill.name, "kind": skill.kind, "path": str(cache / "tasks" / f"{skill.name}.jsonl")}
        if skill.kind == "generate":
            spec["max_new_tokens"] = skill.max_new_tokens
        if limit:
            spec["limit"] = limit
        specs.append(spec)
    return specs


def evaluate(model_dir: Path, cache: Path, split: str = "holdout", threads: int = 2) -> dict:
    """Scores of one model folder on every task's `split` items (the study's holdout split)."""
    import torch

    from evaluators.tasks import parse_evaluation_block

    torch.set_num_threads(threads)
    model, tok = real_model.load(model_dir)
    evaluation = parse_evaluation_block({"tasks": task_specs(cache), "holdout": HOLDOUT, "seed": 0})
    return _score(model, tok, evaluation, split)


def _score(model, tok, evaluation, split: str) -> dict:
    from evaluators.native import make_scorer
    from evaluators.tasks import load_items, select_split

    out = {}
    for spec in evaluation.tasks:
        items = load_items(spec)
        chosen = select_split(items, [it.id for it in items], split=split, holdout=evaluation.holdout,
                              seed=evaluation.seed, limit=spec.limit)
        scorer = make_scorer(spec.kind, chosen, tok, name=spec.name, batch_size=16,
                             max_new_tokens=spec.max_new_tokens)
        scores = scorer.score(model, list(range(len(chosen))))
        metric = spec.metric
        out[spec.name] = round(sum(s[metric] for s in scores) / len(scores), 4)
    return out


HOLDOUT = 0.5


# -------------------------------------------------------------------------------------------------- studies
def write_studies(cache: Path, trials: int = 100, limit: int = 40) -> dict:
    """`<cache>/studies/smollm2_search.yaml` and `smollm2_soup.yaml` with absolute paths into the cache."""
    import yaml

    folder = cache / "studies"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": "smollm2-search", "output_dir": str(cache / "runs" / "smollm2-search"),
            "merge": {"merge_method": "ties", "base_model": str(real_model.base_dir(cache)),
                      "models": [{"model": str(cache / "specialists" / s)} for s in SKILLS],
                      "parameters": {"normalize": True}, "dtype": "float32"},
            "space": {"granularity": "anchors:4", "params": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}},
            "evaluation": {"tasks": task_specs(cache, limit), "holdout": HOLDOUT, "seed": 0},
            "sampler": {"name": "cmaes", "seed": 0}, "pruner": {"name": "none"},
            "seed_trials": ["parents", "uniform", "defaults"],
            "budget": {"trials": trials, "timeout": "10h"}, "device": "auto"}
    soup = {"name": "smollm2-soup", "output_dir": str(cache / "runs" / "smollm2-soup"),
            "checkpoints": [str(cache / "checkpoints" / "math" / "checkpoint-*"), str(cache / "specialists" / "math")],
            "evaluation": {"tasks": [t for t in task_specs(cache) if t["name"] == "math"],
                           "holdout": HOLDOUT, "seed": 0},
            "mode": "greedy", "strict": True, "dtype": "float32", "device": "auto"}
    paths = {}
    for name, data in (("smollm2_search", spec), ("smollm2_soup", soup)):
        path = folder / f"{name}.yaml"
        path.write_text(f"# generated by scripts/real_specialists.py studies\n"
                        + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        paths[name] = str(path)
    return paths


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["data", "baseline", "train", "eval", "studies", "all"])
    p.add_argument("names", nargs="*", help="skills (train) or model folders (eval)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="override a skill's steps (train)")
    p.add_argument("--split", default="holdout", choices=["search", "holdout", "all"])
    p.add_argument("--trials", type=int, default=100, help="search budget written into the study")
    p.add_argument("--limit", type=int, default=40, help="items per split and task during the search")
    p.add_argument("--force", action="store_true", help="redo cached steps")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    cache = args.cache or real_model.cache_dir()
    if args.command in ("data", "all"):
        print(json.dumps(make_data(cache, force=args.force), indent=1))
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
    if args.command in ("studies", "all"):
        print(json.dumps(write_studies(cache, args.trials, args.limit), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
