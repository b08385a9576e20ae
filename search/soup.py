"""Model soups over checkpoints: greedy (Wortsman et al. 2022, recipe 1) and uniform, in memory.

Owns the soup YAML, the greedy algorithm, its step table and the exported linear config. Candidate
soups are materialized by merge_core's SoupEngine (running sum), never written to disk.
"""

from __future__ import annotations

import csv
import glob
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evaluators.suite import Suite
from evaluators.tasks import parse_evaluation_block
from merge_core.config import resolve_path
from merge_core.engine import SoupEngine
from search import StudyError
from search.export import atomic_write_text
from search.report import _plt, save_figure
from search.study import boolean, load_yaml

SOUP_KEYS = {"name", "output_dir", "checkpoints", "evaluation", "mode", "strict", "dtype", "device",
             "write_model"}


@dataclass
class SoupConfig:
    name: str
    path: Path
    output_dir: Path
    checkpoints: list[Path]
    evaluation: object            # evaluators.tasks.EvaluationSpec
    mode: str = "greedy"
    strict: bool = True           # greedy accepts only strict improvements (the paper's code)
    dtype: str | None = None
    device: str = "auto"
    write_model: Path | None = None
    allow_pickle: bool = False    # --allow-pickle (a command-line choice, never read from the YAML)


def expand_checkpoints(entries: list, base_dir: Path, where: str) -> list[Path]:
    """Paths or globs (relative to the YAML's folder) -> existing folders, in natural order, no duplicates."""
    if not isinstance(entries, list) or not entries:
        raise StudyError("give a list of checkpoint folders or globs", where)
    out: list[Path] = []
    for entry in entries:
        full = str(resolve_path(entry, base_dir))
        matches = sorted(glob.glob(full), key=_natural) if glob.has_magic(full) else [full]
        matches = [Path(m) for m in matches if Path(m).is_dir()]
        if not matches:
            raise StudyError(f"no checkpoint folder matches {str(entry)!r}", where)
        out += [m for m in matches if m not in out]
    if len(out) < 2:
        raise StudyError(f"a soup needs at least 2 checkpoints, found {len(out)}", where)
    return out


def _natural(text: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def load_soup(path: Path | str, allow_pickle: bool = False) -> SoupConfig:
    path = Path(path)
    data = load_yaml(path, "soup")
    where = path.name
    unknown = sorted(set(data) - SOUP_KEYS)
    if unknown:
        raise StudyError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(SOUP_KEYS))})",
                         f"{where}: {unknown[0]}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise StudyError("needs a name", f"{where}: name")
    base = path.parent.absolute()
    mode = data.get("mode", "greedy")
    if mode not in ("greedy", "uniform"):
        raise StudyError(f"mode must be greedy or uniform, got {mode!r}", f"{where}: mode")
    if "evaluation" not in data:
        raise StudyError("missing the evaluation block (held-out items to choose ingredients on)",
                         f"{where}: evaluation")
    evaluation = parse_evaluation_block(data["evaluation"], base, where=f"{where}: evaluation")
    write_model = data.get("write_model")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32", "float64"):
        raise StudyError(f"must be bfloat16, float16, float32 or float64, got {dtype!r}", f"{where}: dtype")
    device = data.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise StudyError(f"must be auto, cpu, cuda or cuda:N, got {device!r}", f"{where}: device")
    return SoupConfig(
        name=name, path=path.absolute(), output_dir=resolve_path(data.get("output_dir", f"runs/{name}"), base),
        checkpoints=expand_checkpoints(data.get("checkpoints"), base, f"{where}: checkpoints"),
        evaluation=evaluation, mode=mode, strict=boolean(data.get("strict", True), f"{where}: strict"),
        dtype=dtype, device=device, write_model=resolve_path(write_model, base) if write_model else None,
        allow_pickle=allow_pickle)


@dataclass
class SoupStep:
    step: int
    candidate: str
    individual: float        # the ingredient's own score
    score: float             # score of the soup with it (greedy) / of the ingredient alone (ranking)
    kept: bool


@dataclass
class SoupResult:
    steps: list[SoupStep]
    chosen: list[int]                 # checkpoint indices in the greedy soup
    individual: list[float]           # per checkpoint, selection split
    greedy_score: float
    uniform_score: float
    best_single: int
    holdout: dict[str, float] = field(default_factory=dict)   # label -> report-split score
    seconds: float = 0.0


def greedy_order(scores: list[float]) -> list[int]:
    """Ingredients by decreasing score; ties keep the listed order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def greedy_soup(scores: list[float], soup_score, strict: bool = True) -> tuple[list[int], list[tuple[int, float, bool]]]:
    """Wortsman et al.'s recipe: start from the best ingredient, add each next one (by decreasing
    individual score) if the uniform soup with it scores better (> when strict, >= otherwise).

    `soup_score(kept, candidate)` scores the uniform average of kept + [candidate]. Returns the chosen
    indices and, per tried candidate, (index, score with it, kept).
    """
    order = greedy_order(scores)
    chosen = [order[0]]
    best = scores[order[0]]
    trace = []
    for i in order[1:]:
        score = soup_score(chosen, i)
        take = score > best if strict else score >= best
        trace.append((i, score, take))
        if take:
            chosen.append(i)
            best = score
    return chosen, trace


def run_soup(cfg: SoupConfig, mode: str | None = None, console=None) -> SoupResult:
    """Score every ingredient, build the greedy (or just uniform) soup, and the comparison rows."""
    mode = mode or cfg.mode
    t0 = time.perf_counter()
    engine = SoupEngine(cfg.checkpoints, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle)
    ev = cfg.evaluation
    suite = Suite.from_config(ev, engine.tokenizer, device=engine.device)
    names = [checkpoint_label(p) for p in cfg.checkpoints]
    say = console.print if console is not None else (lambda *a, **k: None)

    def score(model, split="search") -> float:
        return suite.evaluate(model, split=split).score

    individual = []
    for i, name in enumerate(names):
        individual.append(score(engine.show_single(i)))
        say(f"  ingredient {name}: {individual[-1]:.4f}")
    steps = [SoupStep(0, names[i], individual[i], individual[i], False) for i in greedy_order(individual)]

    # uniform soup over everything (running sum, then discarded)
    for i in range(len(names)):
        engine.keep(i)
    uniform_model = engine.show_with(None)
    uniform = score(uniform_model)
    holdout: dict[str, float] = {}
    if ev.has_holdout:
        holdout["uniform soup"] = score(uniform_model, "holdout")
    engine.reset()
    say(f"  uniform soup of {len(names)}: {uniform:.4f}")

    if mode == "uniform":
        chosen = list(range(len(names)))
        greedy_score = uniform
        trace = []
    else:
        def soup_score(kept: list[int], candidate: int) -> float:
            while len(engine.kept) < len(kept):   # keep() the previously accepted ingredients lazily
                engine.keep(kept[len(engine.kept)])
            value = score(engine.show_with(candidate))
            say(f"  + {names[candidate]}: {value:.4f}")
            return value

        chosen, trace = greedy_soup(individual, soup_score, strict=cfg.strict)
        steps = [SoupStep(1, names[chosen[0]], individual[chosen[0]], individual[chosen[0]], True)]
        steps += [SoupStep(n + 2, names[i], individual[i], s, k) for n, (i, s, k) in enumerate(trace)]
        greedy_score = max([individual[chosen[0]]] + [s for _, s, k in trace if k])
    best_single = greedy_order(individual)[0]
    if ev.has_holdout:
        holdout["best single"] = score(engine.show_single(best_single), "holdout")
        if mode == "greedy":
            engine.reset()
            for i in chosen[:-1]:
                engine.keep(i)
            holdout["greedy soup"] = score(engine.show_with(chosen[-1]), "holdout")
    return SoupResult(steps, chosen, individual, greedy_score, uniform, best_single, holdout,
                      time.perf_counter() - t0)


def checkpoint_label(path: Path) -> str:
    return path.name if path.name else str(path)


def soup_config_dict(checkpoints: list[Path], chosen: list[int], dtype: str | None) -> dict:
    """A mergekit linear config with equal weights over the chosen checkpoints."""
    cfg = {"merge_method": "linear",
           "models": [{"model": str(checkpoints[i].absolute()), "parameters": {"weight": 1.0}} for i in chosen],
           "dtype": dtype or "float32"}
    return cfg


def write_outputs(cfg: SoupConfig, result: SoupResult, mode: str) -> dict[str, Path]:
    """soup_config.yaml, soup_table.{csv,md}, soup_steps.png in output_dir."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    names = [checkpoint_label(p) for p in cfg.checkpoints]
    chosen_names = ", ".join(names[i] for i in result.chosen)
    header = (f"# mergesearch soup {cfg.name!r} ({mode}): {len(result.chosen)} of {len(names)} checkpoints\n"
              f"# score: {mode} {result.greedy_score:.6g}, uniform {result.uniform_score:.6g}, best single "
              f"{names[result.best_single]} {result.individual[result.best_single]:.6g}\n"
              f"# ingredients: {chosen_names}\n# Runs unchanged in mergekit: mergekit-yaml THIS_FILE OUT_DIR\n")
    config = soup_config_dict(cfg.checkpoints, result.chosen, cfg.dtype)
    paths = {"config": out / "soup_config.yaml"}
    atomic_write_text(paths["config"], header + yaml.safe_dump(config, sort_keys=False))
    rows = [{"step": s.step, "candidate": s.candidate, "individual": round(s.individual, 6),
             "soup score": round(s.score, 6), "kept": s.kept} for s in result.steps]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths["csv"] = out / "soup_table.csv"
    atomic_write_text(paths["csv"], buf.getvalue())
    md = ["| step | candidate | individual | soup score | kept |", "|---|---|---|---|---|"]
    md += [f"| {r['step']} | {r['candidate']} | {r['individual']:.4f} | {r['soup score']:.4f} | "
           f"{'yes' if r['kept'] else 'no'} |" for r in rows]
    md += ["", "| soup | selection score | report score |", "|---|---|---|"]
    for label, value in comparison_rows(result, names):
        md.append(f"| {label} | {value:.4f} | {result.holdout.get(label.split(' (')[0], float('nan')):.4f} |")
    paths["markdown"] = out / "soup_table.md"
    atomic_write_text(paths["markdown"], "\n".join(md) + "\n")
    paths["plot"] = plot_steps(result, out / "soup_steps.png")
    return paths


def comparison_rows(result: SoupResult, names: list[str]) -> list[tuple[str, float]]:
    return [("greedy soup", result.greedy_score), ("uniform soup", result.uniform_score),
            (f"best single ({names[result.best_single]})", result.individual[result.best_single])]


def plot_steps(result: SoupResult, path: Path) -> Path:
    plt = _plt()
    greedy = [s for s in result.steps if s.step > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [s.step for s in greedy]
    ax.plot(xs, [s.score for s in greedy], "o-", label="soup with candidate")
    for s in greedy:
        ax.annotate(("+" if s.kept else "x") + s.candidate, (s.step, s.score), fontsize=7, rotation=30)
    ax.axhline(result.uniform_score, color="C2", ls="--", label="uniform soup")
    ax.axhline(result.individual[result.best_single], color="C3", ls=":", label="best single")
    ax.set_xlabel("greedy step")
    ax.set_ylabel("score (selection items)")
    ax.set_title("greedy soup")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
