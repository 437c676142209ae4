"""data=csv: labels from a CSV/TSV file, with the folders' checks and messages."""
import csv

import pytest

from safetrain import data as D
from safetrain.cli import compose
from safetrain.data.sources import Columns, list_csv, load_files
from safetrain.errors import DataError
from safetrain.run import run
from tests.conftest import write_images


def _table(tmp_path, rows, name="labels.csv", header=("path", "label"), delimiter=","):
    with open(tmp_path / name, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return tmp_path / name


def _images(tmp_path, classes=3, per_class=10):
    root = write_images(tmp_path / "imgs", classes=classes, per_class=per_class, size=(12, 12))
    return sorted(root.rglob("*.png"))


def test_a_csv_lists_images_with_labels_and_splits_relative_to_the_file(tmp_path):
    files = _images(tmp_path)
    rows = [(str(f.relative_to(tmp_path)), f"kind {f.parent.name[-1]}", "validation" if i % 5 == 0 else "train")
            for i, f in enumerate(files)]
    path = _table(tmp_path, rows, "meta.tsv", ("file", "tag", "subset"), "\t")
    listing = list_csv(str(path), Columns("file", "tag", "subset"))
    assert listing.classes == ["kind 0", "kind 1", "kind 2"] and {s for s, _, _ in listing.rows} == {"train", "val"}
    src = load_files(listing, None, "memory", tmp_path / ".cache", 0)
    assert len(src.parts["train"]) == 24 and len(src.parts["val"]) == 6 and src.shape == (3, 12, 12)
    assert src.parts["val"].ids[0] == str(files[0].relative_to(tmp_path))  # ids: relative to the CSV file


def test_csv_problems_are_named_by_line_and_column(tmp_path):
    files = _images(tmp_path, classes=2, per_class=4)
    good = [(str(f.relative_to(tmp_path)), f.parent.name) for f in files]
    with pytest.raises(DataError, match=r"has no column \['label'\]; its columns are \['path', 'class'\]\. Name "
                                        r"them with data\.path_column=path data\.label_column=class \(as its cells "
                                        r"suggest\)"):
        list_csv(str(_table(tmp_path, good, header=("path", "class"))), Columns())
    ids = [(f"{k:04d}", "cat" if k % 2 else "dog", "train" if k % 3 else "test") for k in range(12)]  # Kaggle's ids
    with pytest.raises(DataError, match=r"Name them with data\.path_column=id data\.label_column=breed "
                                        r"data\.split_column=fold \(as its cells suggest\)\.$"):
        list_csv(str(_table(tmp_path, ids, header=("id", "breed", "fold"))), Columns())
    with pytest.raises(DataError, match=r"Name them with data\.path_column=\.\.\. data\.label_column=\.\.\., and "
                                        r"data\.split_column=\.\.\. if a column holds"):  # two id-like columns
        list_csv(str(_table(tmp_path, [(f"{k}", f"x{k}") for k in range(6)], header=("a", "b"))), Columns())
    with pytest.raises(DataError, match=r"2 rows cannot be used \(line 3: no label; line 5: split 'holdout'\).*"
                                        r"subset one of"):
        rows = [(p, "" if i == 1 else c, "holdout" if i == 3 else "train") for i, (p, c) in enumerate(good)]
        list_csv(str(_table(tmp_path, rows, header=("path", "label", "subset"))), Columns(split="subset"))
    spaced = _table(tmp_path, good, "spaced.csv", header=("path", " label "))
    assert list_csv(str(spaced), Columns()).classes == ["class_0", "class_1"]  # a header's spaces are no names
    with pytest.raises(DataError, match=r"data\.root='.*nope\.csv' is not a file"):
        list_csv(str(tmp_path / "nope.csv"), Columns())
    missing = _table(tmp_path, good + [("imgs/gone.png", "class_0")])
    with pytest.raises(DataError, match=r"(?s)1 of 9 files cannot be used:\n  .*gone\.png: no such file.*"
                                        r"data\.bad_files=skip"):
        load_files(list_csv(str(missing), Columns()), None, "memory", tmp_path / ".cache", 0)
    src = load_files(list_csv(str(missing), Columns()), None, "memory", tmp_path / ".cache", 0, bad_files="skip")
    assert len(src.parts["all"]) == 8 and list(src.left_out["bad"]) == ["imgs/gone.png"]


def test_a_csv_saved_in_a_windows_encoding_is_refused_with_how_to_convert_it(tmp_path):
    """Excel's plain 'CSV' on Windows is cp1252: a label like 'café' was a UnicodeDecodeError traceback."""
    files = _images(tmp_path, classes=2, per_class=4)
    text = "path,label\n" + "".join(f"{f.relative_to(tmp_path)},{'café' if f.parent.name.endswith('0') else 'thé'}\n"
                                     for f in files)
    (tmp_path / "labels.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(DataError, match=r"labels\.csv is not UTF-8 text \(byte 0xe9 .*Save it as 'CSV UTF-8'.*iconv"):
        list_csv(str(tmp_path / "labels.csv"), Columns())
    (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
    assert list_csv(str(tmp_path / "labels.csv"), Columns()).classes == ["café", "thé"]


def test_csv_paths_written_on_windows_or_another_machine_are_found_beside_the_csv(tmp_path, caplog):
    """A CSV made on Windows (img\\cat\\1.png), or with absolute paths of the machine that made it
    (C:\\Users\\ana\\..., /home/ana/...), or of ids of the files in a folder beside it: read as folders, found
    (said in the log), not 'no usable image among the files'. A CSV away from its images names that rule."""
    files = _images(tmp_path, classes=2, per_class=4)
    rel = [str(f.relative_to(tmp_path)) for f in files]
    for name, prefix, sep in (("win.csv", "", "\\"), ("drive.csv", "C:\\Users\\ana\\photos\\", "\\"),
                              ("home.csv", "/home/ana/photos/", "/")):
        table = _table(tmp_path, [(prefix + r.replace("/", sep), f.parent.name) for r, f in zip(rel, files)], name)
        listing = list_csv(str(table), Columns())
        assert [f for _, f, _ in listing.rows] == [f.resolve() for f in files], name
    assert "they start with /home/ana/photos, which is not on this machine" in caplog.text
    assert "they start with C:\\Users\\ana\\photos" in caplog.text and "8 of the 8 files" in caplog.text
    (tmp_path / "train_images").mkdir()  # Kaggle's layout: ids in the CSV, the files in a folder beside it
    flat = [f.rename(tmp_path / "train_images" / f"{f.parent.name}_{f.name}") for f in files]
    ids = _table(tmp_path, [(f.stem, f.stem.split("_img")[0]) for f in flat], "ids.csv", header=("image_id", "label"))
    listing = list_csv(str(ids), Columns(path="image_id"))
    assert [f for _, f, _ in listing.rows] == [f.resolve() for f in flat] and listing.classes == ["class_0", "class_1"]
    assert "read from " + str(tmp_path / "train_images") + " with .png added to each name" in caplog.text
    (tmp_path / "away").mkdir()
    away = _table(tmp_path / "away", [(r, f.parent.name) for r, f in zip(rel, files)])
    with pytest.raises(DataError, match=r"(?s)none of the 8 files listed can be used.*no such file.*relative to the "
                                        r"CSV's own folder"):
        load_files(list_csv(str(away), Columns()), None, "memory", tmp_path / ".cache", 0)


@pytest.mark.slow
def test_a_run_from_a_csv_trains_and_keeps_its_spec(tmp_path):
    files = _images(tmp_path, classes=3, per_class=20)
    path = _table(tmp_path, [(str(f), f.parent.name) for f in files])  # absolute paths work too
    cfg, _ = compose("imagefolder", ["data=csv", f"data.root={path}", "trainer.max_epochs=1", "data.batch_size=16",
                                     "model=cnn", "model.widths=[8,16]", "trainer.progress=false"])
    final = run(cfg, tmp_path / "run")
    assert final["classes"] == ["class_0", "class_1", "class_2"] and final["epochs_run"] == 1
    spec = D.DataSpec.from_dict(__import__("torch").load(tmp_path / "run" / "checkpoints" / "best.pt",
                                                         weights_only=True)["data_spec"])
    assert spec.name == "csv" and spec.path_column == "path" and spec.root == str(path)


def test_m08_a_label_written_two_ways_is_refused_with_both_spellings(tmp_path):
    """'cat', 'Cat ' and 'CAT' in one column would train as three classes, each with a share of the cats (found by
    trying a real CSV: the few odd spellings then failed as classes with no validation image, whose advice was to add
    images). Refused before any image is decoded, each group with its counts; data.allow_similar_labels keeps them."""
    files = _images(tmp_path, classes=2, per_class=12)
    spell = {"class_0": ["cat", "Cat", "CAT"], "class_1": ["sea_lion", "sea-lion", "sea lion"]}
    number = {f: int(f.stem.split("_")[-1]) for f in files}  # img_0 and img_1 of each class spelled otherwise
    rows = [(str(f.relative_to(tmp_path)), spell[f.parent.name][number[f] + 1 if number[f] < 2 else 0]) for f in files]
    path = _table(tmp_path, rows)
    with pytest.raises(DataError, match=r"\[M08\] CSV .*labels.csv: 2 label\(s\) written more than one way.*'CAT' "
                                        r"\(1\) and 'Cat' \(1\) and 'cat' \(10\); 'sea lion' \(1\) and 'sea-lion' "
                                        r"\(1\) and 'sea_lion' \(10\).*data\.allow_similar_labels=true"):
        D.load_source(D.DataSpec(name="csv", root=str(path)), tmp_path / ".cache")
    assert not (tmp_path / ".cache").exists() or not any((tmp_path / ".cache").rglob("*.pt"))  # nothing decoded
    kept = D.load_source(D.DataSpec(name="csv", root=str(path), allow_similar_labels=True), tmp_path / ".cache")
    assert len(kept.classes) == 6
    folders = write_images(tmp_path / "folders", classes=2, per_class=3, size=(12, 12))
    (folders / "class_0").rename(folders / "Class_1")  # two folders, one class
    with pytest.raises(DataError, match=r"'Class_1' \(3\) and 'class_1' \(3\)"):
        D.load_source(D.DataSpec(name="imagefolder", root=str(folders)), tmp_path / ".cache")


def test_m13_labels_that_join_several_tags_are_warned_with_the_delimiter_that_reads_them():
    """A tag column read without data.label_delimiter: 'cat|animal', 'cat|animal|outdoor' ... would each train as a
    class (a softmax over combinations); warned with the setting. Class names that merely hold the character are not."""
    from safetrain.data import joined_labels
    tags = ["cat|animal", "cat|animal|outdoor", "dog|animal", "truck|vehicle", "ship|vehicle|outdoor"]
    found = joined_labels(tags)
    assert found.row == "M13" and "data.label_delimiter='|'" in found.fix and "5 of the 5 labels hold '|'" in str(found)
    assert joined_labels(["cat", "dog", "sea lion", "t-shirt"]) is None
    assert joined_labels(["a|b", "c|d", "e", "f"]) is None  # no part recurs: names that hold '|'
    planet = ["clear primary", "clear primary water", "haze primary", "clear primary road", "cloudy",
              "partly_cloudy primary", "haze primary water", "clear primary road water"]  # space-joined tags
    assert "data.label_delimiter=' '" in joined_labels(planet).fix
    breeds = ["golden retriever", "labrador retriever", "flat-coated retriever", "german shepherd", "border collie",
              "bearded collie", "pug"]  # names of several words, some shared: not tags
    assert joined_labels(breeds) is None


def test_an_image_listed_twice_is_read_once_or_refused_when_its_labels_differ(tmp_path):
    files = _images(tmp_path, classes=2, per_class=6)
    rows = [(str(f.relative_to(tmp_path)), f.parent.name) for f in files]
    listing = list_csv(str(_table(tmp_path, rows + rows[:2])), Columns())
    assert len(listing.rows) == 12  # the repeated rows counted once
    with pytest.raises(DataError, match=r"imgs/class_0/img_0.png listed twice, as 'class_0' and 'class_1'.*an image "
                                        r"one row"):
        list_csv(str(_table(tmp_path, rows + [(rows[0][0], "class_1")], "two.csv")), Columns())
