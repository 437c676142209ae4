"""Sources, splits, statistics and pipelines."""
import json
import re
import shutil
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from safetrain import data as D
from safetrain.cli import compose
from safetrain.data import stored
from safetrain.data.sources import Columns, list_csv, load_folder
from safetrain.errors import ConfigError, DataError
from safetrain.stages import prepare_data, start
from tests.conftest import REPO, SHARED_CIFAR, write_images


def test_stratified_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)
    kept, cut = D.stratified_split(labels, 0.2, seed=3)
    assert set(kept.tolist()).isdisjoint(cut.tolist())
    assert sorted(kept.tolist() + cut.tolist()) == list(range(160))
    assert torch.bincount(labels[cut]).tolist() == [20, 10, 2]
    again, _ = D.stratified_split(labels, 0.2, seed=3)
    other, _ = D.stratified_split(labels, 0.2, seed=4)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_make_splits_carves_val_and_test_without_overlap(tmp_path):
    src = D.load_source(D.DataSpec("synthetic", synthetic=tuple(dict(classes=3, samples_per_class=50, channels=1,
                                                                     size=8).items())), tmp_path)
    splits = D.make_splits(src, val_fraction=0.2, test_fraction=0.1, seed=0)
    ids = {k: set(v.ids) for k, v in splits.items()}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert sum(len(v) for v in ids.values()) == 150
    for s in splits.values():  # every class in every split
        assert set(s.labels.tolist()) == {0, 1, 2}


def test_folder_with_train_and_test_keeps_the_given_test_split(tmp_path):
    write_images(tmp_path / "train", 2, 20)
    write_images(tmp_path / "test", 2, 5, seed=1)
    src = load_folder(str(tmp_path), None, "auto", tmp_path / "cache", 0)
    splits = D.make_splits(src, 0.1, 0.1, 0)
    assert len(splits["test"]) == 10 and all(i.startswith("test/") for i in splits["test"].ids)
    assert all(i.startswith("train/") for i in splits["val"].ids) and len(splits["val"]) == 4


def test_channel_stats_match_numpy_reference():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (37, 3, 9, 7), dtype=np.uint8)
    mean, std = D.channel_stats(torch.from_numpy(imgs).split(5))  # streamed in uneven batches
    ref = imgs.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-9)


def _prepare(root, *overrides):
    """The data stage alone, as a run calls it."""
    cfg, _ = compose("imagefolder", [f"data.root={root}", "data.batch_size=8", "data.num_workers=0", *overrides])
    return prepare_data(start(cfg))


def test_stats_come_from_the_train_split_only_and_are_cached(tmp_path, monkeypatch):
    write_images(tmp_path / "train", 2, 10)
    (tmp_path / "test" / "class_0").mkdir(parents=True)
    (tmp_path / "test" / "class_1").mkdir(parents=True)
    from PIL import Image
    for k in (0, 1):  # white test images would move the mean a lot if they leaked in
        Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / f"test/class_{k}/w.png")
    calls = []
    real = D.channel_stats
    monkeypatch.setattr(D, "channel_stats", lambda batches: calls.append(1) or real(batches))
    monkeypatch.setattr("safetrain.data.stats.channel_stats", D.channel_stats)
    data = _prepare(tmp_path)
    ref = data.splits["train"].images.double().div(255).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(data.facts.mean, ref.numpy(), rtol=1e-9)
    assert _prepare(tmp_path).facts.mean == data.facts.mean and len(calls) == 1  # second time from the cache


def test_streaming_and_memory_paths_give_identical_splits_and_stats(tmp_path):
    write_images(tmp_path / "imgs", 3, 12, size=(10, 6))
    memory, stream = (_prepare(tmp_path / "imgs", f"data.loader={kind}", f"data.cache_dir={tmp_path / kind}",
                               "data.min_eval_per_class=1") for kind in ("memory", "stream"))
    assert memory.splits["train"].images is not None and stream.splits["train"].images is None
    assert {k: v.ids for k, v in memory.splits.items()} == {k: v.ids for k, v in stream.splits.items()}
    np.testing.assert_allclose(memory.facts.mean, stream.facts.mean, rtol=1e-12)
    np.testing.assert_allclose(memory.facts.std, stream.facts.std, rtol=1e-12)
    for a, b in zip(memory.loaders.val, stream.loaders.val):  # the same normalized batches from both paths
        torch.testing.assert_close(a, b)


def test_folder_with_mixed_sizes_trains_at_a_chosen_size_or_the_given_one(tmp_path):
    write_images(tmp_path / "a", 1, 3, size=(8, 8))
    write_images(tmp_path / "b", 1, 3, size=(12, 12))
    (tmp_path / "a" / "class_0").rename(tmp_path / "cat")
    (tmp_path / "b" / "class_0").rename(tmp_path / "dog")
    (tmp_path / "a").rmdir(), (tmp_path / "b").rmdir()
    low = __import__("safetrain.data.files", fromlist=["AUTO_SIDE"]).AUTO_SIDE["cpu"][0]  # tiny images: up to it
    assert load_folder(str(tmp_path), None, "memory", tmp_path / ".cache", 0).parts["all"].images.shape == (6, 3, low, low)
    src = load_folder(str(tmp_path), 10, "memory", tmp_path / ".cache", 0)
    assert src.parts["all"].images.shape == (6, 3, 10, 10)


def test_split_folders_named_as_exports_name_them_are_read_and_others_beside_them_named(tmp_path, caplog):
    """Roboflow exports train/ valid/ test/ and Kaggle datasets often Training/ Validation/: valid/ was silently
    not read (its images unused, val carved from train). Two folders for one split are refused; a folder beside the
    splits is named as not read."""
    write_images(tmp_path / "Training", 2, 20)
    write_images(tmp_path / "valid", 2, 6, seed=1)
    write_images(tmp_path / "notes", 2, 3, seed=2)
    src = load_folder(str(tmp_path), None, "auto", tmp_path / "cache", 0)
    splits = D.make_splits(src, 0.1, 0.1, 0)
    assert len(splits["val"]) == 12 and all(i.startswith("valid/") for i in splits["val"].ids)
    assert all(i.startswith("Training/") for i in splits["train"].ids + splits["test"].ids)
    assert "the folders ['notes'] beside the split folders are not read" in caplog.text
    write_images(tmp_path / "val", 2, 2, seed=3)
    with pytest.raises(DataError, match=r"has val/ and valid/: two folders for one split"):
        load_folder(str(tmp_path), None, "auto", tmp_path / "cache", 0)
    vehicles = tmp_path / "vehicles"  # classes named like splits (a train, a Test group) hold images: classes
    for name in ("bus", "train", "Test"):
        write_images(vehicles / name, 1, 3)
        for f in (vehicles / name / "class_0").iterdir():
            f.rename(vehicles / name / f.name)
        (vehicles / name / "class_0").rmdir()
    assert load_folder(str(vehicles), None, "auto", tmp_path / "cache", 0).classes == ["Test", "bus", "train"]


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_folder(str(tmp_path / "nope"), None, "auto", tmp_path, 0)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:  # what users download, given as it is
        z.writestr("photos/cat/1.jpg", b""), z.writestr("photos/labels.csv", b""), z.writestr("__MACOSX/._x", b"")
    for read, given in ((lambda p: load_folder(p, None, "auto", tmp_path, 0), "photos/photos"),
                        (lambda p: list_csv(p, Columns()), "photos/photos/labels.csv")):
        with pytest.raises(DataError, match=rf"is a \.zip archive.*`unzip {tmp_path}/photos\.zip -d "
                                            rf"{tmp_path}/photos`, then give data\.root={tmp_path}/{given}\.$"):
            read(str(tmp_path / "photos.zip"))
    (tmp_path / "scans.tar.gz").write_bytes(b"\x1f\x8b")  # a tar is not listed (that reads it whole): no top folder
    with pytest.raises(DataError, match=rf"`mkdir {tmp_path}/scans && tar xf {tmp_path}/scans\.tar\.gz -C "
                                        rf"{tmp_path}/scans`, then give data\.root={tmp_path}/scans \(or the "
                                        r"folder in"):
        load_folder(str(tmp_path / "scans.tar.gz"), None, "auto", tmp_path, 0)
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"is a table of labels: read it with data=csv data\.root="):
        load_folder(str(tmp_path / "labels.csv"), None, "auto", tmp_path, 0)
    write_images(tmp_path / "one", 1, 3)
    with pytest.raises(DataError, match=r"\[M08\].*at least 2\. Put each class's images in its own subfolder"):
        load_folder(str(tmp_path / "one"), None, "auto", tmp_path, 0)


def test_a_test_folder_without_class_folders_is_named_as_unlabeled_with_how_to_predict_it(tmp_path, caplog):
    """Kaggle's layout: train/<class>/ and a test/ of images with no label. It cannot be a split; the warning said
    it was 'beside the split folders', listing test/ among them. Now: why it is not read, and the predict command."""
    write_images(tmp_path / "train", 2, 10)
    (tmp_path / "test").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "test" / f"{i}.png")
    src = load_folder(str(tmp_path), None, "auto", tmp_path / "cache", 0)
    assert len(src.parts["train"]) == 20 and "test" not in src.parts and "beside the split" not in caplog.text
    assert (f"{tmp_path / 'test'} holds images in no class folder: without labels it is not a split, and is not "
            f"read (the test split is carved from train/)") in caplog.text
    assert f"mode=predict predict.checkpoint=<the run> predict.input={tmp_path / 'test'}" in caplog.text


def test_images_labelled_by_their_names_get_the_loop_that_sorts_them_and_split_folders_are_not_classes(tmp_path):
    """Kaggle's dogs-vs-cats: train/cat.0.jpg ... beside test1/1.jpg. Read as it was, train/ and test1/ were two
    classes (a model taught to tell the splits apart); given train/, '0 class folders'. Now both are refused with
    the shell loop that moves each image into its label's folder, which (run here) makes a folder safetrain reads."""
    kaggle = tmp_path / "dogs-vs-cats"
    for d, names in (("train", [f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(4)]), ("test1", ["1.jpg"])):
        (kaggle / d).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (8, 8), (200, 0, 0) if n.startswith("cat") else (0, 0, 200)).save(kaggle / d / n)
    (kaggle / "train" / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"the class folders \['test1', 'train'\] are named like splits.*tell the "
                                        r"splits apart.*start with a label \(cat 4, dog 4\)"):
        load_folder(str(kaggle), None, "auto", tmp_path / "cache", 0)
    with pytest.raises(DataError, match=r"has 0 class folder\(s\).*start with a label \(cat 4, dog 4\)") as e:
        load_folder(str(kaggle / "train"), None, "auto", tmp_path / "cache", 0)
    loop = re.search(r"run `(.*)`, then give data\.root=(.*)\.$", str(e.value))
    subprocess.run(["bash", "-c", loop.group(1)], check=True)
    src = load_folder(loop.group(2), None, "auto", tmp_path / "cache", 0)
    assert src.classes == ["cat", "dog"] and len(src.parts["all"]) == 8
    with pytest.raises(DataError, match=r"has 0 class folder\(s\) \[\]; a classifier needs at least 2\. Put each "):
        load_folder(str(kaggle / "test1"), None, "auto", tmp_path / "cache", 0)  # 1.jpg: no label in its name


def test_a_folder_holding_its_table_of_labels_and_a_single_image_get_the_command_that_reads_them(tmp_path, caplog):
    """Kaggle's dog-breed layout (labels.csv beside train/ and test/ of images named by id) given as data.root: a
    'split-named classes' or '1 class folder' refusal without the way out; an image file given as data.root."""
    for part in ("train", "test"):
        (tmp_path / "breeds" / part).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "breeds" / part / f"{part}{i:032x}.jpg")
    table = tmp_path / "breeds" / "labels.csv"
    table.write_text("id,breed\n")
    said = rf"It holds labels\.csv: to read the labels from it, data=csv data\.root={table}$"
    with pytest.raises(DataError, match=r"named like splits.*" + said):
        load_folder(str(tmp_path / "breeds"), None, "auto", tmp_path / "cache", 0)
    shutil.rmtree(tmp_path / "breeds" / "test")
    with pytest.raises(DataError, match=r"has 1 class folder\(s\) \['train'\].*" + said):
        load_folder(str(tmp_path / "breeds"), None, "auto", tmp_path / "cache", 0)
    (tmp_path / "breeds" / "test").mkdir()  # back, as images/: two folders that are not the labels
    for f in sorted((tmp_path / "breeds" / "train").iterdir())[:2]:
        f.rename(tmp_path / "breeds" / "test" / f.name)
    (tmp_path / "breeds" / "test").rename(tmp_path / "breeds" / "images")
    table.write_text("id,breed\n" + "".join(f"{f.stem},pug\n" for f in (tmp_path / "breeds").rglob("*.jpg")))
    load_folder(str(tmp_path / "breeds"), None, "auto", tmp_path / "cache", 0)
    assert f"{table} names 3 of the images in the class folders ['images', 'train']" in caplog.text
    caplog.clear()
    table.write_text("id,breed\n" + "".join(f"{f.stem},{f.parent.name}\n" for f in tmp_path.rglob("*.jpg")))
    load_folder(str(tmp_path / "breeds"), None, "auto", tmp_path / "cache", 0)  # its labels are the folders'
    assert "names 3 of the images" not in caplog.text
    one = next((tmp_path / "breeds" / "train").iterdir())
    with pytest.raises(DataError, match=rf"is not a folder\..*mode=predict predict\.checkpoint=<the run> "
                                        rf"predict\.input={one}$"):
        load_folder(str(one), None, "auto", tmp_path / "cache", 0)


def test_class_folders_one_level_down_and_images_in_no_class_folder_are_named(tmp_path, caplog):
    """An archive that unpacks into photos/photos/<class>/: the message points data.root one level down; an image
    beside the class folders (in none of them) was silently not read."""
    write_images(tmp_path / "photos" / "photos", 2, 4)
    with pytest.raises(DataError, match=rf"one level down: data\.root={tmp_path / 'photos' / 'photos'}$"):
        load_folder(str(tmp_path / "photos"), None, "auto", tmp_path / "cache", 0)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "photos" / "stray.png")
    src = load_folder(str(tmp_path / "photos" / "photos"), None, "auto", tmp_path / "cache", 0)
    assert len(src.parts["all"]) == 8 and "1 image(s) in" in caplog.text and "are in no class folder" in caplog.text


def test_class_folders_grouped_in_folders_are_read_as_the_groups_and_the_log_says_so(tmp_path, caplog):
    """animals/cat, animals/dog, vehicles/truck: torchvision's rule (a class is a top folder, read recursively)
    trains 2 classes where the user may have meant 3; the log names the pooled subfolders and how to split them."""
    caplog.set_level("INFO")
    for group, names in (("animals", ("cat", "dog")), ("vehicles", ("truck",))):
        for name in names:
            write_images(tmp_path / "pooled" / group / name, 1, 3)
    src = load_folder(str(tmp_path / "pooled"), None, "auto", tmp_path / "cache", 0)
    assert src.classes == ["animals", "vehicles"] and len(src.parts["all"]) == 9
    assert "each class is a top folder, the images of its subfolders pooled: animals/ = cat, dog; vehicles/ = truck" \
        in caplog.text
    caplog.clear()
    load_folder(str(write_images(tmp_path / "flat", 2, 3)), None, "auto", tmp_path / "cache", 0)
    assert "pooled" not in caplog.text


def test_download_failure_gives_one_clear_error(monkeypatch, tmp_path):
    import torchvision.datasets as tvd

    def offline(*a, **k):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        D.load_source(D.DataSpec("cifar10", root=str(tmp_path), num_workers=0), tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "data.root" in msg and "data=imagefolder" in msg


def test_eval_pipeline_is_deterministic_and_train_pipeline_augments():
    norm = D.Normalize([0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    ev = D.BatchPipeline(norm, torch.device("cpu"))
    assert torch.equal(ev(x), ev(x))
    torch.testing.assert_close(ev(x), (x.float() / 255 - 0.5) / 0.25)
    tr = D.BatchPipeline(norm, torch.device("cpu"), D.Augment("crop_flip"), seed=0)
    a, b = tr(x), tr(x)
    assert a.shape == x.shape and not torch.equal(a, b)
    torch.testing.assert_close(norm.denormalize(ev(x)), x.float() / 255)


def test_shift_flip_moves_images_by_at_most_a_sixteenth_of_their_side():
    x = torch.zeros(256, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 15, 15] = 255  # one bright pixel, away from the mirror axis
    out = D.BatchPipeline(D.Normalize([0.0], [1.0]), torch.device("cpu"), D.Augment("shift_flip"), seed=0)(x)
    where = torch.stack([torch.nonzero(o[0] > 0.5)[0] for o in out])  # (256, 2): where the pixel went
    assert where[:, 0].min() == 13 and where[:, 0].max() == 17  # +-2 px vertically (2 = 32 / 16)
    # columns: 15 +- 2 as it was, 16 +- 2 mirrored; 13 only unmirrored, 18 only mirrored: both happen
    assert where[:, 1].min() == 13 and where[:, 1].max() == 18


def test_train_loader_shuffles_and_drops_last_eval_loader_keeps_order():
    s = D.ImageSet(torch.arange(10) % 2, [str(i) for i in range(10)],
                   torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous())
    pipe = D.BatchPipeline(D.Normalize([0.0], [1.0]), torch.device("cpu"))
    kw = dict(seed=0)
    train = D.make_loader(s, pipe, batch_size=4, train=True, **kw)
    ev = D.make_loader(s, pipe, batch_size=4, train=False, **kw)
    assert len(train) == 2 and len(ev) == 3
    order = torch.cat([(x[:, 0, 0, 0] * 255).round() for x, _ in ev]).long().tolist()
    assert order == list(range(10))
    epochs = [torch.cat([(x[:, 0, 0, 0] * 255).round() for x, _ in train]).long().tolist() for _ in range(2)]
    assert epochs[0] != epochs[1] and epochs[0] != list(range(8))


def test_stream_workers_are_spawned_once_cuda_is_initialized(tmp_path, monkeypatch):
    """Forking a process that has initialized CUDA can deadlock; spawned workers must still work."""
    write_images(tmp_path / "imgs", 2, 6)
    src = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "cache", 1, disk_cache=False)  # workers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    loader = D.make_loader(src.parts["all"], D.BatchPipeline(D.Normalize([0.5] * 3, [0.2] * 3), torch.device("cpu")),
                           batch_size=4, train=False, seed=0, decoding=src.decoding(num_workers=1))
    assert loader.loader.multiprocessing_context.get_start_method() == "spawn"
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 0, 0]


def test_m06_exact_copies_stay_within_one_split_when_safetrain_splits():
    """A folder where some photos were saved twice (even under two classes): safetrain's own split keeps every
    group of copies on one side, so no held-out image is a copy of a training one; without copies the split is
    the one of single samples (the golden runs hold it bit for bit)."""
    g = torch.Generator().manual_seed(0)
    unique = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(200) % 4
    copies = torch.arange(0, 120, 2)  # 60 images saved again, a third of them under another class
    images = torch.cat([unique, unique[copies]])
    labels = torch.cat([labels, torch.where(copies % 3 == 0, (labels[copies] + 1) % 4, labels[copies])])
    src = D.Source([f"c{k}" for k in range(4)], {"all": D.ImageSet(labels, [str(i) for i in range(260)], images)},
                   "fp", (3, 8, 8))
    splits = D.make_splits(src, 0.2, 0.2, seed=0)
    assert D.exact_duplicates(splits) == [] and sum(len(s) for s in splits.values()) == 260
    assert min(len(splits["val"]), len(splits["test"])) >= 40  # still about a fifth each
    plain = D.Source(src.classes, {"all": D.ImageSet(labels[:200], [str(i) for i in range(200)], unique)}, "fp",
                     (3, 8, 8))
    keep, cut = D.stratified_split(labels[:200], 0.2, 0, 1)
    assert torch.equal(cut, D.stratified_split(labels[:200], 0.2, 0, 1, torch.arange(200))[1])
    assert D.make_splits(plain, 0.2, 0.2, seed=0)["test"].ids == [str(i) for i in cut.tolist()]


def test_random_resized_crops_zoom_in_keep_the_shape_and_are_the_identity_at_full_scale():
    x = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()  # a ramp
    plain = D.BatchPipeline(D.Normalize([0.0] * 3, [1.0] * 3), torch.device("cpu"))(x)
    whole = D.BatchPipeline(D.Normalize([0.0] * 3, [1.0] * 3), torch.device("cpu"),
                            D.Augment("rrc", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)))(x)
    torch.testing.assert_close(whole, plain, atol=1e-5, rtol=0)  # the whole image: unchanged
    out = D.BatchPipeline(D.Normalize([0.0] * 3, [1.0] * 3), torch.device("cpu"),
                          D.Augment("rrc", crop_scale=(0.25, 0.5)), seed=1)(x)
    span = out[:, 0, 16].amax(1) - out[:, 0, 16].amin(1)  # the ramp's range left in the crop
    assert out.shape == x.shape and (span < 0.8 * (plain[0, 0, 16].max() - plain[0, 0, 16].min())).all()
    assert out[:, 0, 16].amin(1).unique().numel() > 10  # every sample its own box


def test_photo_policies_are_seeded_per_sample_and_resume_exactly():
    x = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    make = lambda: D.BatchPipeline(D.Normalize([0.5] * 3, [0.25] * 3), torch.device("cpu"),  # noqa: E731
                                   D.Augment("rrc_trivial"), seed=7)
    a, b = make(), make()
    first = a(x)
    assert torch.equal(first, b(x))  # the seed decides every draw, torchvision's included
    state = a.g.get_state()
    second = a(x)
    assert not torch.equal(first, second)
    a.g.set_state(state)  # what a resumed run restores (loader state_dict)
    assert torch.equal(a(x), second)


def test_mix_makes_class_probabilities_and_training_counts_the_larger_share():
    from safetrain.engine import Limits, Setup, train_epoch
    from safetrain.engine import Precision
    s = D.ImageSet(torch.arange(64) % 4, [str(i) for i in range(64)],
                   torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8))
    for mix in ("mixup", "cutmix"):
        pipe = D.BatchPipeline(D.Normalize([0.5] * 3, [0.25] * 3), torch.device("cpu"), D.Augment("flip", mix=mix),
                               num_classes=4)
        x, y = next(iter(D.make_loader(s, pipe, batch_size=16, train=True, seed=0)))
        assert y.shape == (16, 4) and torch.allclose(y.sum(1), torch.ones(16)) and (y.max(1).values < 1).any()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = type("NoSchedule", (), {"after_step": lambda self: None})()
    out = train_epoch(Setup(net, torch.nn.CrossEntropyLoss(), opt, sched),
                      D.make_loader(s, pipe, batch_size=16, train=True, seed=0), Precision(torch.device("cpu"), bf16=False),
                      Limits(1), "mix")
    assert 0 <= out["acc"] <= 1 and out["label_counts"].sum() == 64 and np.isfinite(out["loss"])


def test_augment_auto_takes_the_measured_choice_and_flips_only_where_they_keep_the_label():
    assert D.resolve_augment("auto", True, True) == "shift_flip" and D.resolve_augment("auto", True, False) == "shift"
    assert D.resolve_augment("auto", False, True) == "crop_flip" and D.resolve_augment("auto", False, False) == "crop"
    assert D.resolve_augment("crop", True, True) == "crop"  # a name given is kept


@pytest.mark.parametrize("setting, fine", [("data.crop_scale=[0.02,1.0]", False), ("data.crop_ratio=[0.3,3.0]", False),
                                           ("data.crop_scale=[0.6,0.4]", False), ("data.crop_scale=[0.5,1.5]", False),
                                           ("data.crop_scale=[0.08,1.0]", True)])
def test_m05_random_resized_crops_beyond_the_bounds_are_refused_unless_unlocked(setting, fine, tmp_path):
    from safetrain.config import unlocks
    from safetrain.errors import ConfigError
    args = [f"data.root={tmp_path}", "data.augment=rrc_flip", setting]
    if fine:
        compose("imagefolder", args)
        return
    with pytest.raises(ConfigError, match=r"^\[M05\] data.crop_"):
        compose("imagefolder", args)
    if "[0.6" not in setting and "1.5" not in setting:  # a shape error stays one; the bounds can be unlocked
        cfg, _ = compose("imagefolder", [*args, "data.allow_strong_crop=true"])
        assert any(f.row == "M05" and "allow_strong_crop" in f.message for f in unlocks(cfg))


def test_m41_iterative_split_spreads_rare_labels_over_every_part_keeps_sizes_and_groups():
    from safetrain.data.splits import iterative_split
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(600, 6, generator=g) < torch.tensor([0.5, 0.3, 0.1, 0.05, 0.02, 0.0])  # rare labels
    labels[:5, 5] = True  # a label with 5 images in all
    groups = torch.arange(600)
    groups[300:320] = groups[280:300]  # 20 pairs of copies
    parts = iterative_split(labels, [0.8, 0.1, 0.1], seed=3, groups=groups)
    assert sorted(torch.cat(parts).tolist()) == list(range(600))  # a partition
    assert [len(p) for p in parts] == pytest.approx([480, 60, 60], abs=6)
    for p in parts[1:]:  # val and test: every label that has at least 10 images is in both
        assert labels[p][:, :5].any(0).all()
    counts = labels.sum(0).double()
    for p, f in zip(parts, (0.8, 0.1, 0.1)):  # each label shared out in about the fractions
        assert torch.allclose(labels[p].sum(0).double()[:5], f * counts[:5], atol=3)
    where = torch.empty(600, dtype=torch.int64)
    for k, p in enumerate(parts):
        where[p] = k
    assert torch.equal(where[300:320], where[280:300])  # copies on one side
    again = iterative_split(labels, [0.8, 0.1, 0.1], seed=3, groups=groups)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def _epoch(src, disk: bool, seed: int = 3) -> list:
    """One training epoch's augmented batches of the folder's images, as the streamed loader gives them."""
    pipe = D.BatchPipeline(D.Normalize([0.5] * 3, [0.2] * 3), torch.device("cpu"), D.Augment("crop_flip"), seed=seed)
    loader = D.make_loader(src.parts["all"], pipe, batch_size=4, train=True, seed=seed,
                           decoding=src.decoding(num_workers=2))
    assert (loader.loader is None) == disk  # the disk cache, or DataLoader workers decoding the files
    return [(x.clone(), y.clone()) for x, y in loader]


def test_a_streamed_folder_is_decoded_once_to_disk_and_its_epochs_read_only_that(tmp_path):
    """data.loader=stream: the pass that checks the files writes every decoded image to a file in the cache; the
    epochs read it (in a thread ahead of training), giving the same batches as decoding the files each time in
    DataLoader workers (disk_cache off), and never open the files again: the files overwritten with garbage change
    nothing."""
    write_images(tmp_path / "imgs", 2, 10, size=(12, 9))
    files = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c1", 0, disk_cache=False)
    disk = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c2", 0)
    assert files.parts["all"].stored is None and disk.parts["all"].images is None
    assert len(list((tmp_path / "c2").rglob("*.images.u8"))) == 1
    assert disk.parts["all"].digests == files.parts["all"].digests  # of the decoded pixels, as in memory
    expected = _epoch(files, disk=False)
    for f in (tmp_path / "imgs").rglob("*.png"):
        f.write_bytes(b"not an image any more")
    got = _epoch(disk, disk=True)
    assert len(got) == len(expected) == 5
    for (x, y), (xe, ye) in zip(got, expected):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    with pytest.raises(Exception, match="cannot decode|cannot identify"):
        _epoch(files, disk=False)  # the files path does read them


def test_the_disk_cache_is_decoded_again_when_its_image_file_is_gone(tmp_path, caplog):
    write_images(tmp_path / "imgs", 2, 6)
    load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c", 0)
    raw, = (tmp_path / "c").rglob("*.images.u8")
    raw.unlink()
    src = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c", 0)
    assert "lacks its image files" in caplog.text and raw.is_file()
    assert src.parts["all"].stored[0:2].shape == (2, 3, 8, 8)


def test_a_disk_cache_that_would_not_fit_the_disk_is_refused_with_what_to_do(tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 2, 6)
    monkeypatch.setattr("safetrain.data.stored.shutil.disk_usage", lambda _: SimpleNamespace(free=2**29))  # 0.5 GiB
    with pytest.raises(DataError, match=r"even re-encoded as JPEG.*do not fit on the disk.*0\.5 GB free.*data\."
                                        r"cache_dir=DIR.*data\.disk_cache=false") as e:
        load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c", 0)
    assert str(tmp_path / "c") in str(e.value)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # nothing half-written left behind


def _smooth_images(folder, classes=2, per_class=8, side=40):
    """Photo-like images (smooth gradients, a class-dependent brightness): what JPEG is made for."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    for k in range(classes):
        (folder / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb = np.stack([xx * (60 + 10 * i), yy * 90, (xx + yy) * 40], -1) + 40 + 100 * k
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(folder / f"c{k}" / f"{i}.png")


def test_a_disk_too_small_for_the_raw_cache_gets_the_images_re_encoded_as_jpeg(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    """data.disk_cache=auto: where the raw file would not fit (40x40: 4.8 KB an image) but JPEGs would, the epochs
    read JPEGs at the training size: the same splits (pixel hashes of the decode pass), pixels within a few grey
    levels of the raw cache's, the same batches otherwise; the next run finds that cache whatever the free disk."""
    _smooth_images(tmp_path / "imgs")
    raw = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c1", 0)
    tight = 2**30 + 16 * 3072 + 16 * 4800 // 2  # the spare GiB, the 32-px copies, half the raw images
    monkeypatch.setattr("safetrain.data.stored.shutil.disk_usage", lambda _: SimpleNamespace(free=tight))
    jpeg = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c2", 0)
    assert "re-encoded as JPEG at quality 95" in caplog.text
    a, b = raw.parts["all"], jpeg.parts["all"]
    assert type(a.stored).__name__ == "DiskImages" and type(b.stored).__name__ == "JpegImages"
    assert a.digests == b.digests and a.ids == b.ids
    x, y = a.stored[0:16].float(), b.stored[torch.arange(16)].float()
    assert 0 < (x - y).abs().mean() < 1.5 and (x - y).abs().max() < 24 and abs(x.mean() - y.mean()) < 0.5
    assert torch.equal(b.stored[[5, 2, 9]], b.stored[torch.arange(16)][[5, 2, 9]])  # any order of rows
    for (xa, ya), (xb, yb) in zip(_epoch(raw, disk=True), _epoch(jpeg, disk=True)):
        assert torch.equal(ya, yb) and (xa - xb).abs().mean() < 0.05  # normalized: std 0.2 -> 1.5 grey levels
    monkeypatch.undo()
    caplog.clear()
    again = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c2", 0)
    assert "decoded images loaded from cache" in caplog.text
    assert type(again.parts["all"].stored).__name__ == "JpegImages"


def test_a_disk_that_fills_while_the_jpegs_are_written_leaves_nothing_behind(tmp_path, monkeypatch):
    _smooth_images(tmp_path / "imgs", per_class=200)
    free = iter([2**31] * 2 + [2**30] * 100)  # enough when the kind is chosen, then the spare GiB only
    monkeypatch.setattr("safetrain.data.stored.shutil.disk_usage", lambda _: SimpleNamespace(free=next(free)))
    with pytest.raises(DataError, match=r"filled up while the images were re-encoded.*data\.cache_dir=DIR"):
        load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c", 0, disk_cache="jpeg")
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_torchcodec_is_needed_only_by_the_jpeg_cache(tmp_path, monkeypatch):
    """TorchCodec is built for one torch version: where it does not load, safetrain imports and trains from memory or
    the raw cache, and the JPEG cache stops before writing anything, with the two ways out."""
    code = ("import sys; sys.modules['torchcodec'] = None; import safetrain.cli, safetrain.data.stored; "
            "print('torchcodec' in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
    _smooth_images(tmp_path / "imgs", per_class=20)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import of it raises ImportError
    with pytest.raises(DataError, match=r"needs TorchCodec, which does not load here.*pip install torchcodec.*"
                                         r"data\.disk_cache=raw"):
        load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c", 0, disk_cache="jpeg")
    assert not [p for p in (tmp_path / "c").rglob("*.tmp")]
    raw = load_folder(str(tmp_path / "imgs"), None, "stream", tmp_path / "c2", 0, disk_cache="raw")
    assert type(raw.parts["all"].stored).__name__ == "DiskImages"


def test_data_disk_cache_takes_its_kinds_and_the_old_true(tmp_path):
    for value, mode in (("true", "auto"), ("false", None), ("jpeg", "jpeg"), (True, "auto"), (False, None)):
        assert stored.disk_mode(value) == mode
    with pytest.raises(ConfigError, match=r"data\.disk_cache='zip' is not one of \['auto', 'raw', 'jpeg'"):
        compose("smoke", ["data.disk_cache=zip"])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_the_scale_benchmark_runs_every_stage_with_tiny(tmp_path):
    """benchmarks/scale.py --tiny: the folder made from the CIFAR-10 copy, the loaders compared, the audit searched
    approximately (and exactly, on the same queries), the streamed data stage: every stage, on 600 images."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--tiny", "--json",
                          str(tmp_path / "rows.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    stages = [r.get("stage", "made") for r in rows]
    assert stages[:5] == ["made", "first pass (decode once, write the raw cache)", "loader only, raw cache, to cpu",
                          "first pass (decode once, write the jpeg cache)", "loader only, jpeg cache, to cpu"]
    assert all(r["safetrain_disk_cache"] > 0 and r["torchvision_imagefolder_pil"] > 0 for r in rows
               if "ratio" in r)
    audits = [r for r in rows if r.get("stage") == "audit"]
    assert len(audits) == 2 and all(r["planted_recall"] >= 0.9 and r["subset"]["same_flags"] for r in audits)
    assert rows[-1]["stage"].startswith("data stage, streamed") and rows[-1]["peak_rss_mb"] > 0
