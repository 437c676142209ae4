"""The data audit: planted faults are found and named, healthy data raises no warning."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from safetrain.cli import compose
from safetrain.data.audit import audit, reference, shifted_diff, thumbnails
from safetrain.data.sources import ImageSet
from safetrain.run import run


def smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8 photos-ish: smooth random colour fields, all different."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=size, mode="bicubic", align_corners=False)
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def make_folder(root, per_class=(30, 8, 0), seed=0):
    """train/ and test/ (and val/ when its count is > 0) of two classes, no image like another."""
    for j, (split, n) in enumerate(zip(("train", "test", "val"), per_class)):
        for k in range(n and 2):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i, arr in enumerate(smooth_images(n, seed + 100 * k + 7 * j)):
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _run(root, tmp_path, name="run", *more):
    cfg, _ = compose("imagefolder", [f"data.root={root}", "trainer.max_epochs=1", "data.batch_size=8",
                                     "model=cnn_tiny", "trainer.progress=false", *more])
    return run(cfg, tmp_path / name), tmp_path / name


def test_m06_a_reencoded_shifted_test_image_in_train_is_found(tmp_path):
    root = make_folder(tmp_path / "imgs")
    src = np.array(Image.open(root / "test" / "class_1" / "3.png"))
    copy = Image.fromarray(np.roll(src, 1, axis=1))  # moved by one pixel ...
    copy.save(root / "train" / "class_1" / "copy.jpg", quality=70)  # ... and re-encoded as JPEG
    final, run_dir = _run(root, tmp_path)
    report = json.loads((run_dir / "audit.json").read_text())
    pairs = [(p["id"], p["train_id"]) for p in report["near_duplicates"]]
    assert ("test/class_1/3.png", "train/class_1/copy.jpg") in pairs
    assert report["summary"]["near_duplicate_fraction"]["test"] == pytest.approx(1 / 16)
    assert any(w.startswith("[M06] 1 val/test images are near-duplicates") for w in final["warnings"])
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 0 and first["warnings"][0].startswith("[M06]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert "audit/near_duplicates" in EventAccumulator(str(run_dir / "tb")).Reload().Tags()["images"]


def test_m06_a_streamed_folder_is_audited_as_the_same_folder_in_memory(tmp_path, monkeypatch):
    """data.loader=stream: the pass that checks the files keeps each image at the audit's size, so the near-duplicate
    search (at the split and after it) and the blank-image check find what they find in memory; the search over
    the training thumbnails in chunks (REF_CHUNK) finds what one pass finds."""
    root = make_folder(tmp_path / "imgs", per_class=(40, 8, 0))  # val carved from train: both searches run
    src = np.array(Image.open(root / "test" / "class_1" / "3.png"))
    Image.fromarray(np.roll(src, 1, axis=1)).save(root / "train" / "class_1" / "copy.jpg", quality=70)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "train" / "class_0" / "blank.png")
    kept = {}
    for loader in ("memory", "stream"):
        if loader == "stream":
            monkeypatch.setattr("safetrain.data.audit.REF_CHUNK", 7)  # many chunks of training thumbnails
        final, run_dir = _run(root, tmp_path, loader, f"data.loader={loader}",
                              f"data.cache_dir={tmp_path / loader}")  # each its own audit, not the other's cached
        kept[loader] = {k: v for k, v in json.loads((run_dir / "audit.json").read_text()).items()
                        if k in ("near_duplicates", "kept_together", "blank", "skipped")}
        assert ("test/class_1/3.png", "train/class_1/copy.jpg") in [(p["id"], p["train_id"])
                                                                    for p in kept[loader]["near_duplicates"]]
        assert any(w.startswith("[M06] 1 val/test images are near-duplicates") for w in final["warnings"])
    assert kept["stream"] == kept["memory"] and kept["stream"]["blank"] == ["train/class_0/blank.png"]


def test_m06_a_healthy_folder_gives_no_audit_warning(tmp_path):
    final, run_dir = _run(make_folder(tmp_path / "imgs", per_class=(110, 20, 0)), tmp_path)  # val/test 20 a class
    assert json.loads((run_dir / "audit.json").read_text())["near_duplicates"] == []
    assert final["warnings"] == []  # no audit, preflight or training alarm on healthy images


def test_m08_blank_images_and_conflicting_copies_are_reported(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=(30, 8, 6))  # own val/: nothing is carved from train
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "train" / "class_0" / "blank.png")
    (root / "train" / "class_1" / "dup.png").write_bytes((root / "train" / "class_0" / "5.png").read_bytes())
    final, run_dir = _run(root, tmp_path)
    text = " ".join(final["warnings"])
    assert "[M08] 1 images are blank or constant (e.g. train/class_0/blank.png)" in text
    assert "[M08] 1 identical images carry different labels" in text
    assert "train/class_0/5.png" in text and "train/class_1/dup.png" in text


def test_m08_a_folder_whose_images_are_mostly_in_two_class_folders_is_audited_and_told_about_several_labels(
        tmp_path):
    """cat/, dog/ and outdoor/ holding copies of most of them (a multi-label task filed in folders): the typical
    distance between training images was the one to an exact copy, 0, and the audit a ZeroDivisionError traceback.
    Now the typical distance skips exact copies, and the many conflicts point to the multi-label CSV."""
    root = tmp_path / "imgs"
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i, arr in enumerate(smooth_images(24, 10 + k)):
            Image.fromarray(arr).save(root / name / f"{i}.png")
    (root / "outdoor").mkdir()
    for name in ("cat", "dog"):
        for i in range(18):
            (root / "outdoor" / f"{name}_{i}.png").write_bytes((root / name / f"{i}.png").read_bytes())
    final, run_dir = _run(root, tmp_path)
    assert json.loads((run_dir / "audit.json").read_text())["typical_distance"] > 0.1
    text = " ".join(final["warnings"])
    assert "identical images carry different labels (e.g. cat/" in text and "or the images show several classes" \
        in text and "data=csv data.label_column=labels 'data.label_delimiter=|'" in text


def test_near_duplicate_scores_tolerate_shift_reencoding_and_colour_but_not_other_images():
    imgs = torch.from_numpy(smooth_images(6, 0)).permute(0, 3, 1, 2).contiguous()
    shifted = torch.roll(imgs, shifts=(2, -1), dims=(2, 3))
    brighter = (imgs.float() * 0.8 + 30).clamp(0, 255).byte()
    assert (shifted_diff(imgs, shifted) < 0.05).all() and (shifted_diff(imgs, brighter) < 0.05).all()
    others = torch.roll(imgs, shifts=1, dims=0)  # each image against a different one
    assert (shifted_diff(imgs, others) > 0.5).all()
    t = thumbnails(imgs)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(6))
    a = audit({"train": ImageSet(torch.zeros(6, dtype=torch.long), [f"t{i}" for i in range(6)], imgs),
               "val": ImageSet(torch.zeros(1, dtype=torch.long), ["v"], shifted[:1]),
               "test": ImageSet(torch.zeros(1, dtype=torch.long), ["x"], brighter[3:4])})
    assert {(p["id"], p["train_id"]) for p in a.near_duplicates} == {("v", "t0"), ("x", "t3")}


def test_m06_a_mirrored_copy_is_found(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=(30, 8, 6))  # own val/: the copy stays in train
    src = np.array(Image.open(root / "test" / "class_0" / "2.png"))
    Image.fromarray(src[:, ::-1]).save(root / "train" / "class_0" / "mirror.jpg", quality=80)
    _, run_dir = _run(root, tmp_path)
    pairs = [(p["id"], p["train_id"]) for p in json.loads((run_dir / "audit.json").read_text())["near_duplicates"]]
    assert pairs == [("test/class_0/2.png", "train/class_0/mirror.jpg")]


def look_alikes(n: int, seed: int, prototypes: torch.Tensor) -> torch.Tensor:
    """Noisy variations of a few prototypes: every image has many close neighbours, none is a copy."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(prototypes), (n,), generator=g)
    x = prototypes[pick] + 0.08 * torch.randn((n, *prototypes.shape[1:]), generator=g)
    return (x.clamp(0, 1) * 255).round().byte()


def test_m06_look_alikes_are_not_copies_the_judgement_is_relative_to_the_dataset():
    g = torch.Generator().manual_seed(0)
    protos = F.interpolate(torch.rand(6, 3, 4, 4, generator=g), size=24, mode="bicubic").clamp(0, 1)
    train, test = look_alikes(300, 1, protos), look_alikes(40, 2, protos)
    copy = (test[:1].float() * 0.9 + 12).round().byte()  # and one real copy, its contrast changed
    sets = {"train": ImageSet(torch.zeros(301, dtype=torch.long), [f"t{i}" for i in range(301)],
                              torch.cat([train, copy])),
            "val": ImageSet(torch.zeros(1, dtype=torch.long), ["v"], look_alikes(1, 3, protos)),
            "test": ImageSet(torch.zeros(40, dtype=torch.long), [f"x{i}" for i in range(40)], test)}
    a = audit(sets)
    assert [(p["id"], p["train_id"]) for p in a.near_duplicates] == [("x0", "t300")]
    assert 0 < a.typical_distance and a.near_duplicates[0]["relative"] < 0.5


def test_m06_images_too_small_to_tell_copies_from_look_alikes_are_not_searched():
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(60, 1, 8, 8, generator=g) * 255).byte()
    near = (imgs[:5].float() * 0.9 + 10).byte()  # 8x8 near-copies: at this size no verdict is possible
    sets = {"train": ImageSet(torch.zeros(60, dtype=torch.long), [f"t{i}" for i in range(60)], imgs),
            "val": ImageSet(torch.zeros(5, dtype=torch.long), [f"v{i}" for i in range(5)], near),
            "test": ImageSet(torch.zeros(5, dtype=torch.long), [f"x{i}" for i in range(5)], near)}
    a = audit(sets)
    assert a.near_duplicates == [] and "too small" in a.summary()["near_duplicate_search"]


def _planted_copies(root, n=50, copies=16, conflicting=3):
    """One folder per class (safetrain splits): `copies` images of each class also saved moved by a pixel and
    re-encoded as JPEG, the last `conflicting` of class 1's copies filed under class 0. -> [(original, copy) ids]."""
    pairs = []
    for k in range(2):
        (root / f"class_{k}").mkdir(parents=True)
        for i, arr in enumerate(smooth_images(n, 100 * k)):
            Image.fromarray(arr).save(root / f"class_{k}" / f"{i}.png")
            if i < copies:
                into = 0 if k == 1 and i >= copies - conflicting else k
                Image.fromarray(np.roll(arr, 1, axis=1)).save(root / f"class_{into}" / f"copy_{k}_{i}.jpg", quality=75)
                pairs.append((f"class_{k}/{i}.png", f"class_{into}/copy_{k}_{i}.jpg"))
    return root, pairs


def test_m06_near_duplicates_stay_in_one_split_when_safetrain_splits(tmp_path):
    root, pairs = _planted_copies(tmp_path / "imgs")
    final, run_dir = _run(root, tmp_path)
    where = {sid: name for name, ids in json.loads((run_dir / "splits.json").read_text()).items() for sid in ids}
    straddling = [(a, b) for a, b in pairs if where[a] != where[b]]
    assert straddling == []  # each planted pair in one split: the copies of val/test images were moved into train
    report = json.loads((run_dir / "audit.json").read_text())
    kept = {(p["id"], p["train_id"]) for p in report["kept_together"]}
    assert kept and report["summary"]["near_duplicates_kept_in_train"] == len(kept)
    assert "near_duplicates_kept_in_train: " in (run_dir / "report.md").read_text()  # the report says how many
    assert kept <= {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}  # only planted copies were moved
    assert report["near_duplicates"] == []  # nothing left to flatter the scores
    conflicts = [p for p in report["kept_together"] if p["labels"][0] != p["labels"][1]]
    said = [w for w in final["warnings"] if "near-duplicate pairs kept together in train carry different" in w]
    assert bool(said) == bool(conflicts)


def test_m08_near_copies_with_different_labels_kept_together_are_a_finding():
    from safetrain.data.audit import Audit, findings
    from safetrain.data.splits import join_near_copies
    img = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    splits = {"train": ImageSet(torch.tensor([0, 1]), ["a", "b"], img[:2]),
              "val": ImageSet(torch.tensor([1]), ["c"], img[2:3]), "test": ImageSet(torch.tensor([0]), ["d"], img[3:])}
    joined = join_near_copies(splits, [{"split": "val", "id": "c", "train_id": "a", "ratio": 0.2}])
    assert joined["train"].ids == ["a", "b", "c"] and len(joined["val"]) == 0 and joined["test"].ids == ["d"]
    said = [str(f) for f in findings(Audit(kept_together=joined["train"].joined))]
    assert any(s.startswith("[M08] 1 of the 1 near-duplicate pairs kept together") and "c and a" in s for s in said)
    # a pair that stands out from its crowd less clearly, with two labels: more likely two similar shots
    loose = join_near_copies(splits, [{"split": "val", "id": "c", "train_id": "a", "ratio": 0.5}])
    assert not [f for f in findings(Audit(kept_together=loose["train"].joined)) if f.row == "M08"]


def test_m06_a_copy_between_carved_val_and_test_joins_val_and_follows_its_copy_into_train():
    from safetrain.data.splits import join_near_copies
    img = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    splits = {"train": ImageSet(torch.tensor([0, 1]), ["a", "b"], img[:2]),
              "val": ImageSet(torch.tensor([0, 1]), ["v1", "v2"], img[2:4]),
              "test": ImageSet(torch.tensor([0, 1]), ["t1", "t2"], img[4:])}
    pairs = [{"split": "test", "id": "t1", "train_id": "v1", "into": "val"},  # t1 copies v1, which stays in val
             {"split": "test", "id": "t2", "train_id": "v2", "into": "val"},  # t2 copies v2, which copies b
             {"split": "val", "id": "v2", "train_id": "b"}]
    out = join_near_copies(splits, pairs)
    assert out["train"].ids == ["a", "b", "v2", "t2"] and out["val"].ids == ["v1", "t1"] and out["test"].ids == []


def test_m08_identical_images_with_different_labels_are_found_in_any_split():
    from safetrain.data.audit import conflicting_copies
    img = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    same = torch.stack([img[0], img[0]])  # a group of copies kept together, in val, under two labels
    splits = {"train": ImageSet(torch.tensor([0, 1]), ["a", "b"], img[1:]),
              "val": ImageSet(torch.tensor([0, 1]), ["v1", "v2"], same), "test": ImageSet(torch.tensor([0]), ["t"], img[:1])}
    found = conflicting_copies(splits)
    assert [f["ids"] for f in found] == [["v1", "v2"]]  # t is a copy with v1's label: not a conflict, v2 is


def test_m08_one_photo_filed_under_two_labels_in_train_is_found_re_encoded_or_resized():
    """Found by trying a messy folder: three photos copied under another class, re-saved (a CMYK JPEG as an RGB PNG,
    re-encoded, resized); the one whose original fell in val was named (kept together), the two in train were not,
    since the near-duplicate search compares val/test with train. Within the training split now too; photos that
    only look alike are not named."""
    from safetrain.data.audit import SAME_PHOTO, findings, same_photo_other_label
    imgs = torch.from_numpy(smooth_images(40, 5)).permute(0, 3, 1, 2).contiguous()
    labels = torch.arange(40) % 2
    buffer = io.BytesIO()
    Image.fromarray(imgs[3].permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=70)
    jpeg = torch.from_numpy(np.asarray(Image.open(buffer)).copy()).permute(2, 0, 1)
    small = F.interpolate(imgs[6:7].float(), size=24, mode="bilinear", antialias=True)
    back = F.interpolate(small, size=32, mode="bilinear").round().clamp(0, 255).byte()[0]
    train = ImageSet(torch.cat([labels, torch.tensor([0, 1])]), [str(i) for i in range(42)],
                     torch.cat([imgs, jpeg[None], back[None]]))  # 3 (class 1) as class 0, 6 (class 0) as class 1
    found = same_photo_other_label(train, typical=float(shifted_diff(imgs[:20], imgs[20:]).median()))
    assert [p["ids"] for p in found] == [["3", "40"], ["6", "41"]] and all(p["relative"] <= SAME_PHOTO for p in found)
    assert same_photo_other_label(ImageSet(labels, [str(i) for i in range(40)], imgs), 1.0) == []
    a = audit({"train": train, "val": ImageSet(labels[:4], list("abcd"), imgs[:4].flip(2)),
               "test": ImageSet(labels[:4], list("efgh"), imgs[4:8].flip(2))})
    said = [str(f) for f in findings(a)]
    assert any(s.startswith("[M08] 2 pairs of training images are the same photo under different labels") for s in said)


def test_m06_the_audit_counts_the_groups_of_exact_copies_kept_in_one_split():
    from safetrain.data import make_splits
    from safetrain.data.sources import Source
    imgs = torch.from_numpy(smooth_images(40, 3)).permute(0, 3, 1, 2).contiguous()
    imgs = torch.cat([imgs, imgs[:5]])  # 5 images twice: 5 groups of copies
    src = Source(["a", "b"], {"all": ImageSet(torch.arange(45) % 2, [str(i) for i in range(45)], imgs)}, "fp",
                 (3, 32, 32))
    splits = make_splits(src, 0.2, 0.2, seed=0)
    assert audit(splits).summary()["exact_copy_groups_kept_in_one_split"] == 5


def test_m06_the_audit_searches_only_the_splits_whose_copies_were_not_searched_at_the_split(tmp_path, monkeypatch):
    """val carved by safetrain was searched for near-copies when it was cut (they joined train); the audit searches
    the user's own test split, not val a second time (the longest step before training on CIFAR-10)."""
    import safetrain.data.audit as A
    searched = []
    real = A.near_duplicates
    monkeypatch.setattr(A, "near_duplicates", lambda train, other, split, *a, **k: searched.append(split)
                        or real(train, other, split, *a, **k))
    root = make_folder(tmp_path / "imgs")  # train/ and test/ given, val carved
    src = np.array(Image.open(root / "test" / "class_1" / "3.png"))  # as in the first test: the copy stays in train
    Image.fromarray(np.roll(src, 1, axis=1)).save(root / "train" / "class_1" / "copy.jpg", quality=70)
    final, run_dir = _run(root, tmp_path)
    assert searched == ["val", "test"]  # at the split: the carved val; in the audit: the given test only
    pairs = [(p["id"], p["train_id"]) for p in json.loads((run_dir / "audit.json").read_text())["near_duplicates"]]
    assert pairs == [("test/class_1/3.png", "train/class_1/copy.jpg")]


def _planted_sets(n_train: int = 400, n_test: int = 60):
    """Smooth training images and test images, 8 of the test images planted in train as copies: re-encoded-like
    noise, moved 1 px, every other one mirrored, its contrast changed."""
    train, test = torch.from_numpy(smooth_images(n_train, 1)), torch.from_numpy(smooth_images(n_test, 2))
    g = torch.Generator().manual_seed(3)
    copies = []
    for i in range(8):
        c = test[i].roll(1, dims=1).float() * 0.92 + 8 + 2 * torch.randn(test[i].shape, generator=g)
        copies.append((c.flip(1) if i % 2 else c).clamp(0, 255).round().byte())
    images = torch.cat([train, torch.stack(copies)]).permute(0, 3, 1, 2).contiguous()
    return {"train": ImageSet(torch.zeros(len(images), dtype=torch.long), [f"t{i}" for i in range(len(images))],
                              images),
            "val": ImageSet(torch.zeros(1, dtype=torch.long), ["v"], torch.from_numpy(smooth_images(1, 4))
                            .permute(0, 3, 1, 2).contiguous()),
            "test": ImageSet(torch.zeros(n_test, dtype=torch.long), [f"x{i}" for i in range(n_test)],
                             test.permute(0, 3, 1, 2).contiguous())}


def test_m06_a_large_training_split_is_searched_approximately_and_finds_the_same_copies(monkeypatch, caplog):
    """Above EXACT_MAX training images the candidates come from faiss's HNSW graphs: the same copies as the exact
    search; without faiss the exact search runs, and the log says what to install."""
    pytest.importorskip("faiss")  # in the dev extra
    sets = _planted_sets()
    exact = audit(sets)
    assert sorted(p["id"] for p in exact.near_duplicates) == [f"x{i}" for i in range(8)]
    monkeypatch.setattr("safetrain.data.audit.EXACT_MAX", 100)
    assert reference(sets["train"], torch.device("cpu")).graphs is not None
    graph = audit(sets)
    assert [(p["id"], p["train_id"]) for p in graph.near_duplicates] == \
        [(p["id"], p["train_id"]) for p in exact.near_duplicates]
    assert graph.typical_distance == pytest.approx(exact.typical_distance, rel=0.02)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # not installed
    assert audit(sets).near_duplicates == exact.near_duplicates
    assert "pip install faiss-cpu" in caplog.text


def textured(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) uint8: random colour fields with 12x12 control points (finer than smooth_images: a re-crop
    at another scale moves every edge)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 12, 12, generator=g), size=32, mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().byte()


def test_m06_a_copy_recropped_at_another_scale_and_recoloured_is_found_by_aligning(monkeypatch):
    """Stage 3: six training images cut to their central 24x24 (x1.35), moved by a pixel, scaled back and recoloured
    are beyond stage 2's reach (it has no scale beyond 1/16 of a border); aligning finds them, and no other image."""
    train, others = textured(300, 0), textured(20, 1)
    crop = F.interpolate(train[:6, :, 5:29, 4:28].float(), size=32, mode="bilinear", antialias=True)
    copies = (crop * 0.8 + torch.tensor([20., 0, -10])[:, None, None]).clamp(0, 255).round().byte()
    test = torch.cat([copies, others])
    sets = {"train": ImageSet(torch.zeros(300, dtype=torch.long), [f"t{i}" for i in range(300)], train),
            "val": ImageSet(torch.zeros(1, dtype=torch.long), ["v"], textured(1, 2)),
            "test": ImageSet(torch.zeros(26, dtype=torch.long), [f"x{i}" for i in range(26)], test)}
    found = audit(sets).near_duplicates
    assert len(found) >= 3 and all(p["aligned"] and p["id"][1:] == p["train_id"][1:] for p in found)
    assert all(int(p["id"][1:]) < 6 for p in found)
    monkeypatch.setattr("safetrain.data.audit.ALIGN_FROM", 0.0)  # stage 2 alone
    assert audit(sets).near_duplicates == []
