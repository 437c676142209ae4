"""Seeded, stratified splits: val (and test, when the source has none) carved from train."""
from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from safetrain.data.audit import near_copies
from safetrain.data.sources import DataSpec, ImageSet, Source
from safetrain.errors import DataError
from safetrain.findings import FAIL, Finding

log = logging.getLogger(__name__)


def stratified_split(labels: Tensor, fraction: float, seed: int, minimum: int = 1,
                     groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(kept, carved) sorted indices; `fraction` of every class is carved out, raised towards `minimum`
    where that takes at most a fifth of the class, and at least one sample of every class that has two.
    `groups` (N,): samples with the same id (exact copies) land on the same side, the group counted in the class of
    its first member; without copies the split is the one of single samples."""
    g = torch.Generator().manual_seed(seed)
    y = labels.tolist()
    units: dict[int, list[list[int]]] = {}  # class -> its groups' members, groups in order of their first member
    members: dict[int, list[int]] = {}
    for i, k in enumerate(range(len(y)) if groups is None else groups.tolist()):
        if k not in members:
            members[k] = []
            units.setdefault(y[i], []).append(members[k])
        members[k].append(i)
    kept, carved = [], []
    for c in sorted(units):
        size = sum(len(m) for m in units[c])
        n = _carved(size, fraction, minimum)
        out: list[int] = []
        for m in (units[c][j] for j in torch.randperm(len(units[c]), generator=g).tolist()):
            take = len(out) < n and size - len(out) - len(m) >= 1  # a class always keeps a training sample
            (out if take else kept).extend(m)
        carved += out
    return torch.tensor(sorted(kept), dtype=torch.int64), torch.tensor(sorted(carved), dtype=torch.int64)


def iterative_split(labels: Tensor, fractions: list[float], seed: int, groups: Tensor | None = None) -> list[Tensor]:
    """Multi-label stratification (iterative stratification, Sechidis et al. 2011): `labels` (N, C) multi-hot ->
    one sorted index tensor per fraction. The rarest label still to place goes first: each of its samples (or
    groups of copies, `groups` as in stratified_split, labelled by the union of their members') goes to the part
    that still wants most of that label (ties: most samples wanted, then the seeded draw), so a rare label is
    spread over the parts before common ones fill them; samples without labels fill what is left."""
    g = torch.Generator().manual_seed(seed)
    y = labels.bool()
    ids = torch.arange(len(y)) if groups is None else groups
    units: dict[int, list[int]] = {}
    for i, k in enumerate(ids.tolist()):
        units.setdefault(k, []).append(i)
    members = list(units.values())
    unit_labels = torch.stack([y[m].any(0) for m in members]) if members else y[:0]
    sizes = torch.tensor([len(m) for m in members], dtype=torch.float64)
    frac = torch.tensor(fractions, dtype=torch.float64)
    want_total = frac * sizes.sum()
    want_label = frac[:, None] * (unit_labels.double() * sizes[:, None]).sum(0)[None]  # (parts, C)
    part_of = torch.full((len(members),), -1, dtype=torch.int64)
    order = torch.randperm(len(members), generator=g)
    tie = torch.rand(len(fractions), generator=g, dtype=torch.float64) * 1e-9
    while (part_of < 0).any():
        left = unit_labels & (part_of < 0)[:, None]
        counts = left.sum(0)
        if counts.sum() == 0:  # only unlabelled units remain
            todo = [u for u in order.tolist() if part_of[u] < 0]
            key = None
        else:
            key = int(torch.where(counts > 0, counts, counts.max() + 1).argmin())
            todo = [u for u in order.tolist() if part_of[u] < 0 and left[u, key]]
        for u in todo:
            score = (want_label[:, key] if key is not None else want_total) * 1e6 + want_total + tie
            p = int(score.argmax())
            part_of[u] = p
            want_total[p] -= sizes[u]
            want_label[p] -= unit_labels[u].double() * sizes[u]
    out = []
    for p in range(len(fractions)):
        idx = [i for u in (part_of == p).nonzero().squeeze(1).tolist() for i in members[u]]
        out.append(torch.tensor(sorted(idx), dtype=torch.int64))
    return out


def _carved(size: int, fraction: float, minimum: int) -> int:
    """How many of a class's `size` samples a carved split takes (without copies to keep together)."""
    return min(max(round(size * fraction), min(minimum, size // 5), 1), size - 1) if size >= 2 else 0


def images_needed(train: int, cuts: list[tuple[float, int]]) -> int:
    """The fewest images a class needs for `train` of them to stay in training once the carved splits, `cuts`
    ((fraction, minimum) in the order they are carved), have taken theirs: the number the messages ask for."""
    n = train
    while True:  # each carved split takes at most a share of the class: adding images ends it
        left, taken = n, []
        for cut in cuts:
            taken.append(_carved(left, *cut))
            left -= taken[-1]
        if left >= train and all(taken):  # every carved split scores the class
            return n
        n += 1


def _stratified(labels: Tensor, fraction: float, seed: int, minimum: int, groups: Tensor | None):
    """(kept, carved): stratified by class, or for several labels per image by iterative stratification [M41]."""
    if labels.ndim == 2:
        return tuple(iterative_split(labels, [1 - fraction, fraction], seed, groups))
    return stratified_split(labels, fraction, seed, minimum, groups)


def long_tailed(data: ImageSet, ratio: float, seed: int) -> ImageSet:
    """The standard long-tailed subset (Cao et al. 2019): class k keeps n_max * ratio**(-k / (C - 1)) of
    its samples, so class 0 stays whole and the last class has n_max / ratio; seeded."""
    g = torch.Generator().manual_seed(seed)
    classes = int(data.labels.max()) + 1
    n_max = int(torch.bincount(data.labels).max())
    keep = []
    for k in range(classes):
        idx = (data.labels == k).nonzero().squeeze(1)
        n = min(len(idx), max(1, int(n_max * ratio ** (-k / max(1, classes - 1)))))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return data.subset(torch.cat(keep).sort().values)


def hold_out(data: ImageSet, k: int, folds: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(the rest, the k-th of `folds` folds) of a single-label split: each class dealt out over the folds in a seeded
    order, byte-identical copies in their first copy's fold (a copy in the rest would be predicted in-sample)."""
    g = torch.Generator().manual_seed(seed)
    where = torch.empty(len(data), dtype=torch.int64)
    for c in data.labels.unique().tolist():
        idx = (data.labels == c).nonzero().squeeze(1)
        where[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % folds
    where = where[copy_groups(data)]
    return data.subset((where != k).nonzero().squeeze(1)), data.subset((where == k).nonzero().squeeze(1))


def split_source(src: Source, spec: DataSpec, cache_dir: Path | None = None,
                 device: torch.device = torch.device("cpu")) -> dict[str, ImageSet]:
    """The splits `spec` describes, of `src` (training and the commands after it make them through here). With a
    `cache_dir`, near-duplicates are kept with their training copies (the search cached there, run on `device`)."""
    near = None if cache_dir is None else partial(near_copies, fingerprint=src.fingerprint, cache_dir=cache_dir,
                                                  device=device)
    return make_splits(src, spec.val_fraction, spec.test_fraction, spec.seed, spec.min_samples_per_class,
                       spec.imbalance_ratio, spec.min_eval_per_class, near)


def make_splits(src: Source, val_fraction: float, test_fraction: float, seed: int, min_per_class: int = 1,
                imbalance_ratio: float | None = None, min_eval_per_class: int = 1,
                near: Callable | None = None) -> dict[str, ImageSet]:
    """train/val/test. A source's own splits are kept; what is missing is carved from train
    (test first, then val from the rest), stratified and seeded, so the splits never overlap, with
    `min_eval_per_class` samples of a class where it can spare them; exact copies (byte-identical images) stay
    together on one side of every cut [M06]. `imbalance_ratio` then makes the training split long-tailed. `near`
    (splits, carved split names) -> the audit's near-duplicate pairs of training images in the carved splits
    (audit.near_copies): those images join their copies in train [M06]."""
    parts = dict(src.parts)
    train = parts.pop("train", None) or parts.pop("all")
    groups = copy_groups(train) if not {"val", "test"} <= parts.keys() else None
    if "test" not in parts:
        keep, cut = _stratified(train.labels, test_fraction, seed, min_eval_per_class, groups)
        train, parts["test"], groups = train.subset(keep), train.subset(cut), groups[keep]
    if "val" not in parts:
        keep, cut = _stratified(train.labels, val_fraction, seed + 1, min_eval_per_class, groups)
        train, parts["val"] = train.subset(keep), train.subset(cut)
    if imbalance_ratio:  # after val and test are carved, so they stay balanced
        train = long_tailed(train, imbalance_ratio, seed + 2)
    splits = {"train": train, "val": parts["val"], "test": parts["test"]}
    carved = [name for name in ("val", "test") if name not in src.parts]
    if near is not None and carved and all(len(splits[name]) for name in ("train", *carved)):  # (else refused below)
        splits = join_near_copies(splits, near(splits, carved))
    cuts = [(f, min_eval_per_class) for name, f in (("test", test_fraction), ("val", val_fraction)) if name in carved]
    _check_labels(splits, src.classes, min_per_class, set(src.parts) & {"val", "test"}, cuts)
    return splits


def join_near_copies(splits: dict[str, ImageSet], pairs: list[dict]) -> dict[str, ImageSet]:
    """Each val/test image that is a near-duplicate of a training image ({"split", "id", "train_id"}, audit.py)
    moved into train, with its copy (or `into` val, a test image whose copy is there); train.joined lists them with
    both labels (a pair that disagrees is a wrong label [M08]), for the report."""
    if not pairs:
        return splits
    label = {sid: y for s in splits.values() for sid, y in zip(s.ids, s.labels.tolist())}  # multi-label: a list
    out = dict(splits)

    def move(ids: set, name: str, into: str) -> None:
        go = torch.tensor([sid in ids for sid in out[name].ids], dtype=torch.bool)
        if go.any():
            out[into] = _concat([out[into], out[name].subset(go.nonzero().squeeze(1))])
            out[name] = out[name].subset((~go).nonzero().squeeze(1))
    to_train = {p["id"] for p in pairs if p.get("into", "train") == "train"}
    to_train |= {p["id"] for p in pairs if p.get("into") == "val" and p["train_id"] in to_train}  # with its val copy
    move({p["id"] for p in pairs if p.get("into") == "val"} - to_train, "test", "val")
    move(to_train, "val", "train")
    move(to_train, "test", "train")
    out["train"].joined = [{**p, "labels": [label[p["id"]], label[p["train_id"]]]} for p in pairs]
    log.info("[M06] %d val/test images are near-duplicates of training (or val) images: moved to join their copy, "
             "each group within one split (audit.json lists them)", len(pairs))
    return out


def _concat(sets: list[ImageSet]) -> ImageSet:
    def cat(values):
        return None if any(v is None for v in values) else [x for v in values for x in v]
    def stack(arrays):  # tensors, or rows of a file of the disk cache (data/stored.py)
        return None if any(t is None for t in arrays) else \
            torch.cat(arrays) if isinstance(arrays[0], Tensor) else type(arrays[0]).concat(arrays)
    return ImageSet(torch.cat([s.labels for s in sets]), cat([s.ids for s in sets]), stack([s.images for s in sets]),
                    cat([s.files for s in sets]), cat([s.digests for s in sets]), small=stack([s.small for s in sets]),
                    stored=stack([s.stored for s in sets]))


def copy_groups(data: ImageSet) -> Tensor:
    """(N,) a group id per sample, shared by byte-identical images (the first copy's index) [M06]. The hashes stay
    with `data` (and its subsets), so the check across splits does not read the files again."""
    data.digests = [data.digest(i) for i in range(len(data))]
    first: dict[bytes, int] = {}
    groups = torch.tensor([first.setdefault(h, i) for i, h in enumerate(data.digests)], dtype=torch.int64)
    copies = len(groups) - len(first)
    if copies:
        sizes = torch.bincount(groups)
        log.info("[M06] %d groups of exact copies (%d images) found; each group is kept within one split",
                 int((sizes > 1).sum()), int(sizes[sizes > 1].sum()))
    return groups


def class_counts(splits: dict[str, ImageSet], num_classes: int) -> dict[str, list[int]]:
    """Images per class in each split: the one place classes are counted (facts, checks, sampler, report). Several
    labels per image: the images that carry each label (its positives)."""
    return {name: s.labels.sum(0).long().tolist() if s.labels.ndim == 2 else
            torch.bincount(s.labels, minlength=num_classes).tolist() for name, s in splits.items()}


def _distinct(splits: dict[str, ImageSet], k: int) -> int:
    """How many different images (by content) carry label k, over every split."""
    carry = {name: (s.labels == k) if s.labels.ndim == 1 else s.labels[:, k].bool() for name, s in splits.items()}
    return len({s.digest(i) for name, s in splits.items() for i in carry[name].nonzero().flatten().tolist()})


def _check_labels(splits: dict[str, ImageSet], classes: list[str], min_per_class: int, given: set[str],
                  cuts: list[tuple[float, int]]) -> None:
    """Labels in range; every class scored in val and test [M25]; splits not empty [M07]; enough training images
    per class [M08]. `given`: the splits the source itself defines (folders of the user's), not carved; `cuts`: the
    carved ones' (fraction, minimum), which set how many images a class needs in all."""
    num_classes = len(classes)
    for name, s in splits.items():
        bad = (s.labels < 0) | (s.labels >= num_classes) if s.labels.ndim == 1 else torch.zeros(0, dtype=torch.bool)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(f"[M08] {name} sample {s.ids[i]} has label {int(s.labels[i])}, outside "
                            f"[0, {num_classes}). Labels must be class indices 0..{num_classes - 1}.")
    counts = class_counts(splits, num_classes)
    need = images_needed(min_per_class, cuts)  # what a class needs in all to pass every check below
    carved = " and ".join(word for name, word in (("val", "validation"), ("test", "test")) if name not in given)
    fix = (f"Give every class at least {need} images ({min_per_class} for training, data.min_samples_per_class, and "
           f"the rest for {carved}; more for a trustworthy score)",
           "Add {} images of those classes (the {}/ folder, or rows of that split in the CSV)")
    untrained = {classes[k]: {n: c[k] for n, c in counts.items() if c[k]} for k in range(num_classes)
                 if counts["train"][k] == 0 and any(c[k] for c in counts.values())}
    if untrained:  # a class only in the user's val/test: nothing to learn it from, its scores 0 by construction
        shown = ", ".join(f"{c} ({', '.join(f'{n} {name}' for name, n in where.items())})"
                          for c, where in list(untrained.items())[:5])
        raise DataError(f"[M08] {len(untrained)} class(es) have images in val/test but none in train: {shown}. A model "
                        "cannot learn a class it never trains on. Add training images of those classes (the train/ "
                        "folder, or rows of that split in the CSV), or remove them from val/test.")
    for name in ("val", "test"):  # a class no one can score would vanish from every metric and every choice [M25]
        unscored = {k: sum(c[k] for c in counts.values()) for k in range(num_classes) if counts[name][k] == 0}
        if unscored:
            distinct = {k: _distinct(splits, k) for k in list(unscored)[:5]}
            joined = Counter(p["labels"][0] for p in getattr(splits["train"], "joined", None) or []
                             if p["split"] == name and isinstance(p["labels"][0], int))
            shown = ", ".join(f"{classes[k]} ({n} image{'s' * (n != 1)} in all"
                              + (f", {distinct[k]} distinct" if distinct[k] < n else "")
                              + (f"; {joined[k]} moved from {name} into train beside its near-copy"
                                 if joined[k] else "")
                              + ")" for k, n in list(unscored.items())[:5])
            copies = (" Copies, exact or near, stay in one split (none may be scored against its own copy): count "
                      "distinct images." if any(distinct[k] < n or joined[k] for k, n in list(unscored.items())[:5])
                      else "")
            raise DataError(f"[M25] {len(unscored)} class(es) have no {name} images after the split: {shown}"
                            f"{' ...' if len(unscored) > 5 else ''}. They could never be scored: their recall and F1 "
                            f"would not exist, and the {'checkpoint would be chosen' if name == 'val' else 'test'} "
                            f"blind to them. {fix[name in given].format(name, name)}, or remove those classes.{copies}")
    for name, s in splits.items():
        if len(s) == 0:
            raise DataError(f"[M07] the {name} split is empty. Add images, or raise data.val_fraction / "
                            "data.test_fraction so every split gets some.")
    few = {classes[k]: n for k, n in enumerate(counts["train"]) if n < min_per_class}
    if few:
        where = (f"at least {need} images a class in all, as the split keeps some for {carved}" if cuts else
                 f"at least {min_per_class} a class in the train/ folder")
        raise DataError(f"[M08] classes with fewer than {min_per_class} training samples: {few}. A class needs "
                        f"examples to be learned: add images ({where}), merge or remove those classes, or lower "
                        "data.min_samples_per_class.")


def thin_eval_classes(counts: dict[str, list[int]], classes: list[str], minimum: int) -> list[Finding]:
    """Val/test classes with fewer than `minimum` samples: their per-class metrics, and a macro-F1 that
    selects checkpoints, move by a large step per image [M25]."""
    out = []
    for name in ("val", "test"):
        few = {classes[k]: n for k, n in enumerate(counts[name]) if n < minimum}
        if few:
            shown = ", ".join(f"{c} {n}" for c, n in list(few.items())[:5]) + (" ..." if len(few) > 5 else "")
            picks = " and the macro-F1 that picks the checkpoint" if name == "val" else ""
            out.append(Finding("M25", f"thin {name} classes", (
                f"the {name} split has fewer than {minimum} images of {len(few)} class(es) ({shown}): their "
                f"per-class precision/recall/F1{picks} will be noisy (one image moves a class's recall by "
                f"{1 / max(1, min(few.values())):.0%})."), f"Add images of those classes, or raise "
                f"data.{name}_fraction if the {name} split is carved from train.", "data", evidence={"few": few}))
    return out


def exact_duplicates(splits: dict[str, ImageSet]) -> list[tuple[str, str]]:
    """(id, id) pairs of byte-identical images in different splits, found by a hash of the decoded
    pixels (on the streaming path, hashed by the pass that decoded them) [M06]."""
    first: dict[bytes, tuple[str, str]] = {}
    pairs = []
    for name, s in splits.items():
        for i, sid in enumerate(s.ids):
            h = s.digest(i)
            if h in first and first[h][0] != name:
                pairs.append((first[h][1], f"{name}:{sid}"))
            first.setdefault(h, (name, f"{name}:{sid}"))
    return pairs


def duplicates_finding(pairs: list[tuple[str, str]]) -> Finding | None:
    """Exact copies across splits: training on them would make val/test scores wrong [M06] (a FAIL)."""
    if not pairs:
        return None
    shown = "; ".join(f"{a} = {b}" for a, b in pairs[:3])
    return Finding("M06", "exact copies across splits", f"{len(pairs)} images appear in two splits as exact copies "
                   f"({shown}{' ...' if len(pairs) > 3 else ''}): scores on val/test would be inflated.",
                   "Remove the copies; or, if you gave the splits (train/ val/ test/ folders), put every image in one "
                   "folder per class and let safetrain split them (it keeps copies within one split); or set "
                   "data.allow_duplicates_across_splits=true to train anyway.", "data",
                   verdict=FAIL, evidence={"count": len(pairs), "pairs": pairs[:20]})


def refuse_duplicates(pairs: list[tuple[str, str]], allowed: bool) -> None:
    found = duplicates_finding(pairs)
    if found and not allowed:
        raise DataError(str(found))


def describe(splits: dict[str, ImageSet]) -> dict[str, list[str]]:
    """splits.json: which sample went where, by stable id."""
    return {name: s.ids for name, s in splits.items()}
