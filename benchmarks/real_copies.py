"""Near-duplicates on CIFAR-10's real copies: the test images with a same-photo copy in the training split, judged
by eye.

    python benchmarks/real_copies.py [--out DIR] [--labels benchmarks/real_copies_labels.json]

The audit's search (safetrain.data.audit.search) of the 10,000 test images against the 50,000 training images, with
stage 2 alone (the search before issue 27) and with stage 3 (the aligned distances). Nothing here is planted: there is
no list of the real copies, so the script draws two seeded samples for a person to judge by eye, and estimates:
- precision: 100 random flagged pairs (grids precision_0.png, precision_1.png: the test image left, its training match
  right; A: found by stage 3, P: by stage 2);
- recall: 40 random test images the audit did not flag, in each band of their stage-2 distance to the nearest training
  image (x the typical distance; grids missed_<band>.png, each beside its closest candidate after alignment). The
  copies judged in a band, times the band's size over 40, estimate the copies missed there; recall = the flagged
  copies over those plus the missed ones.
ciFAIR-10's human-judged list (cifair_first512.json): of its copies among the first 512 test images (the ones whose
original index maps onto this copy's file names), how many each search flags.
With --labels (the judgements: ids judged not a copy or unsure among the flagged, copies or unsure among the
unflagged), the script prints the estimates; a sampled id that the labels lack is reported (the samples are seeded:
the same code draws the same images).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _cifar import TARBALL, unpack  # noqa: E402
from safetrain.data import audit as A  # noqa: E402
from safetrain.data.sources import load_folder  # noqa: E402

BANDS = [(0, .5), (.5, .6), (.6, .7), (.7, .8), (.8, 1.0), (1.0, 1.3)]


def grid(pairs: list[tuple[torch.Tensor, torch.Tensor]], captions: list[str], path: Path, scale: int = 3) -> None:
    """Pairs side by side, 5 a row, enlarged `scale` x, each captioned above."""
    s = 32 * scale
    cols, rows = 5, (len(pairs) + 4) // 5
    out = Image.new("RGB", (cols * (2 * s + 14), rows * (s + 20)), "white")
    draw = ImageDraw.Draw(out)
    for k, ((a, b), caption) in enumerate(zip(pairs, captions)):
        x, y = (k % cols) * (2 * s + 14), (k // cols) * (s + 20)
        for j, img in enumerate((a, b)):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((s, s), Image.NEAREST)
            out.paste(tile, (x + j * (s + 4), y + 14))
        draw.text((x + 2, y + 1), caption, fill="black")
    out.save(path)


def nearest_rel(train, test, refs, typical: float) -> torch.Tensor:
    """Each test image's stage-2 distance to its nearest training candidate, x the typical distance."""
    out = []
    for i in range(0, len(test), 1024):
        imgs = test.images[i:i + 1024]
        _, idx = A.candidates(imgs, refs, torch.device("cpu"))
        out.append(A.distances(imgs, train.images, idx).min(1).values / typical)
    return torch.cat(out)


def samples(train, test, pairs: list[dict], rel: torch.Tensor, refs, out: Path, seed: int = 3) -> dict:
    """The seeded samples, their grids, and the ids drawn."""
    g = torch.Generator().manual_seed(seed)
    where = {"train": {s: i for i, s in enumerate(train.ids)}, "test": {s: i for i, s in enumerate(test.ids)}}
    drawn = [pairs[k] for k in torch.randperm(len(pairs), generator=g)[:100].tolist()]
    for h in range(2):
        part = drawn[50 * h:50 * h + 50]
        grid([(test.images[where["test"][p["id"]]], train.images[where["train"][p["train_id"]]]) for p in part],
             [f"{50 * h + k} {'A' if p.get('aligned') else 'P'} {p['relative']:.2f}" for k, p in enumerate(part)],
             out / f"precision_{h}.png")
    flagged = {where["test"][p["id"]] for p in pairs}
    bands = {}
    for lo, hi in BANDS:
        band = torch.tensor([lo <= float(r) < hi and i not in flagged for i, r in enumerate(rel)]).nonzero().squeeze(1)
        pick = band[torch.randperm(len(band), generator=g)[:40]]
        _, idx = A.candidates(test.images[pick], refs, torch.device("cpu"))
        d, _ = A.aligned_distances(test.images[pick], train.images, idx, torch.device("cpu"))
        best = idx.gather(1, d.argmin(1)[:, None]).squeeze(1)
        grid([(test.images[q], train.images[t]) for q, t in zip(pick.tolist(), best.tolist())],
             [f"{k} {float(rel[q]):.2f}" for k, q in enumerate(pick.tolist())], out / f"missed_{lo}-{hi}.png")
        bands[f"{lo}-{hi}"] = {"size": len(band), "ids": [test.ids[q] for q in pick.tolist()]}
    return {"flagged": [p["id"] for p in drawn], "stage": {p["id"]: "A" if p.get("aligned") else "P" for p in drawn},
            "unflagged": bands}


def estimate(drawn: dict, labels: dict, flagged: int, stage2: int) -> dict:
    """Precision and recall from the judgements of the same samples: [low, high] (unsure counted as no copy, as a
    copy). Raises when the labels were given on other samples (judge the new grids)."""
    judged = labels["flagged"]
    if judged["ids"] != drawn["flagged"] or any(labels["unflagged"][k]["ids"] != b["ids"]
                                                for k, b in drawn["unflagged"].items()):
        raise SystemExit("the samples drawn differ from the judged ones: judge the new grids and update the labels")
    n, no, unsure = len(judged["ids"]), len(judged["no"]), len(judged["unsure"])
    prec = [(n - no - unsure) / n, (n - no) / n]
    p2 = [i for i in judged["ids"] if drawn["stage"][i] == "P"]
    prec2 = sum(i not in judged["no"] + judged["unsure"] for i in p2) / max(1, len(p2))
    missed = [0.0, 0.0]
    for band, b in drawn["unflagged"].items():
        j = labels["unflagged"][band]
        missed[0] += b["size"] * len(j["yes"]) / len(b["ids"])
        missed[1] += b["size"] * (len(j["yes"]) + len(j["unsure"])) / len(b["ids"])
    found = [flagged * prec[0], flagged * prec[1]]
    fewest, most = found[0] + missed[0], found[1] + missed[1]  # copies in all: unsure as no copy, as a copy
    return {"precision": [round(x, 3) for x in prec], "missed_estimate": [round(m) for m in missed],
            "recall": [round(found[0] / fewest, 3), round(found[1] / most, 3)],
            "recall_stage2_only": [round(stage2 * prec2 / fewest, 3), round(stage2 * prec2 / most, 3)]}


def cifair(pairs: list[dict], path: Path) -> dict:
    """The human-judged test images with a training copy (ciFAIR-10's list) among the first 512 test images, the ones
    whose original index the known labels map onto this copy's file names: how many the audit flags, by judgment."""
    known = json.loads(path.read_text())
    labels, names = known["test_labels"], known["classes"]
    flagged = {p["id"] for p in pairs}
    found = {1: [0, 0], 2: [0, 0]}  # judgment -> [flagged, listed]
    for row in known["cifair_rows"]:
        i = row["test_index"]
        c = labels[i]
        name = f"test/{names[c]}/{labels[:i].count(c):04d}.jpg"
        found[row["judgment"]][0] += name in flagged
        found[row["judgment"]][1] += 1
    first = {f"test/{names[c]}/{labels[:i].count(c):04d}.jpg" for i, c in enumerate(labels)}
    return {"near_duplicates": found[1], "very_similar": found[2], "flagged_among_first": len(flagged & first),
            "first": len(labels)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("real_copies"))
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("--labels", type=Path, default=Path(__file__).with_name("real_copies_labels.json"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = load_folder(str(unpack(a.tarball, Path(tmp))), None, "memory", Path(tmp) / "cache", 2)
    train, test = A.shrunk(src.parts["train"]), A.shrunk(src.parts["test"])
    runs = {}
    for name, align_from in (("stage 2", 0.0), ("stages 2 and 3", A.ALIGN_FROM)):
        A.ALIGN_FROM, t0 = align_from, time.perf_counter()
        pairs, typical = A.search(train, {"test": test}, torch.device("cpu"))
        runs[name] = {"seconds": round(time.perf_counter() - t0, 1), "pairs": pairs}
        print(f"{name}: {len(pairs)} of {len(test)} test images flagged, {runs[name]['seconds']} s (2 CPU cores)")
    pairs = runs["stages 2 and 3"]["pairs"]
    (a.out / "pairs.json").write_text(json.dumps(pairs, indent=1))
    refs = A.reference(train, torch.device("cpu"))
    drawn = samples(train, test, pairs, nearest_rel(train, test, refs, typical.pixels), refs, a.out)
    (a.out / "samples.json").write_text(json.dumps(drawn, indent=1))
    known = {name: cifair(run["pairs"], Path(__file__).with_name("cifair_first512.json")) for name, run in runs.items()}
    for name, k in known.items():
        print(f"{name}: ciFAIR-10's human-judged copies among the first {k['first']} test images, flagged: "
              f"near-duplicates {k['near_duplicates'][0]} of {k['near_duplicates'][1]}, very similar "
              f"{k['very_similar'][0]} of {k['very_similar'][1]} ({k['flagged_among_first']} of the {k['first']} flagged)")
    (a.out / "cifair.json").write_text(json.dumps(known, indent=1))
    print(f"grids in {a.out}: precision_0/1.png (100 random flagged pairs), missed_<band>.png (40 unflagged a band)")
    if a.labels.exists():
        est = estimate(drawn, json.loads(a.labels.read_text()), len(pairs), len(runs["stage 2"]["pairs"]))
        print(json.dumps(est))
        (a.out / "estimate.json").write_text(json.dumps(est, indent=1))


if __name__ == "__main__":
    main()
