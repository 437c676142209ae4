"""Hydra sweeps (`python -m safetrain -m recipe=NAME key=a,b seed=0,1,2`): every job's config is validated before
the first one starts; a refused, stopped or crashed job is recorded and the sweep goes on; the sweep directory
gets summary.md and summary.json, one row per job, and mean +- std over the jobs that differ only in `seed`."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from safetrain.io import write_json, write_text

JOBS = "jobs.jsonl"


def job_overrides(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a sweep, as Hydra's basic sweeper will run them (comma lists, range(),
    choice() expanded into their product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]


def record(sweep_dir: Path, num: int, overrides: list[str], status: str, message: str = "", final: dict = ()) -> None:
    """One line of jobs.jsonl for a finished job (done, refused, stopped or crashed)."""
    final = dict(final)
    row = {"job": num, "overrides": overrides, "status": status, "message": message[:300],
           **{k: final.get(k) for k in ("selection_metric", "best_val", "test_acc", "test_map", "test_macro_f1")}}
    with (Path(sweep_dir) / JOBS).open("a") as f:
        f.write(json.dumps(row) + "\n")


def summarize(sweep_dir: Path) -> tuple[list[dict], str]:
    """(the job rows, summary.md text); writes summary.md and summary.json."""
    rows = [json.loads(line) for line in (Path(sweep_dir) / JOBS).read_text().splitlines()]
    head = "test_map" if any(r.get("test_map") is not None for r in rows) else "test_acc"  # several labels: mAP
    name = head.replace("_", " ").replace("map", "mAP")
    lines = ["# Sweep summary", "", f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} jobs done.", "",
             f"| job | overrides | status | best val | {name} | test macro-F1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {' '.join(r['overrides'])} | {r['status']}{': ' + r['message'] if r['message'] else ''}"
              f" | {_num(r['best_val'])} | {_num(r.get(head))} | {_num(r['test_macro_f1'])} |" for r in rows]
    groups = seed_groups(rows)
    if groups:
        lines += ["", "## Over seeds (mean +- std)", "", f"| overrides | seeds | {name} | test macro-F1 |",
                  "|---|---|---|---|"]
        lines += [f"| {key or '(recipe)'} | {len(g)} | {_mean_std([r[head] for r in g])} | "
                  f"{_mean_std([r['test_macro_f1'] for r in g])} |" for key, g in groups.items()]
    text = "\n".join(lines) + "\n"
    write_text(Path(sweep_dir) / "summary.md", text)
    write_json(Path(sweep_dir) / "summary.json", {"jobs": rows, "over_seeds": {
        k: {"seeds": len(g), head: [r[head] for r in g]} for k, g in groups.items()}})
    return rows, text


def seed_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished jobs that differ only in `seed`, grouped by their other overrides (groups of 2 or more)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            key = " ".join(o for o in r["overrides"] if not o.lstrip("+").startswith("seed="))
            out.setdefault(key, []).append(r)
    return {k: g for k, g in out.items() if len(g) > 1}


def _num(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs):.4f}"
