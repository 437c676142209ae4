"""Every file in an image folder is decoded right, skipped on purpose, or refused by name (a bad-file zoo)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from safetrain.data.files import Fit, fit_image, header, list_images, to_array
from safetrain.data.sources import decode_image, load_folder
from safetrain.errors import DataError
from tests.conftest import write_images


def test_hidden_files_macos_leftovers_and_special_files_are_skipped(tmp_path):
    root = write_images(tmp_path / "imgs", classes=2, per_class=6)
    (root / "__MACOSX" / "class_0").mkdir(parents=True)  # would become a class
    Image.new("RGB", (8, 8)).save(root / "__MACOSX" / "class_0" / "x.png")
    (root / "class_0" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "class_0" / ".ipynb_checkpoints" / "img_0-checkpoint.png")
    Image.new("RGB", (8, 8)).save(root / "class_0" / ".img000.png")
    (root / "class_1" / "._img_0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    os.mkfifo(root / "class_1" / "pipe.png")  # reading it would hang the run
    files, skipped = list_images(root / "class_0")
    assert [f.name for f in files] == [f"img_{i}.png" for i in range(6)] and skipped == {"hidden": 2}
    src = load_folder(str(root), None, "memory", tmp_path / "cache", 0)
    assert src.classes == ["class_0", "class_1"] and len(src.parts["all"]) == 12


def test_a_class_folder_of_files_that_are_not_images_says_what_it_holds(tmp_path):
    """Camera raw files (.dng) are skipped: the class folder that holds only them names what it found."""
    root = write_images(tmp_path / "photos", classes=2, per_class=3)
    (root / "raw").mkdir()
    for i in range(3):
        (root / "raw" / f"IMG_{i}.DNG").write_bytes(b"II*\x00")
    (root / "raw" / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"class folder .*raw holds no images \(.jpg.*\); what it holds: 3 \.dng, "
                                        r"1 \.txt\. Remove it, put its images in it, or convert them"):
        load_folder(str(root), None, "memory", tmp_path / "cache", 0)


def test_16_bit_images_are_scaled_not_clipped_and_transparency_goes_over_white():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    im16 = Image.fromarray(ramp)  # a 16-bit grayscale image
    arr = to_array(im16, 1)
    assert arr.dtype == np.uint8 and arr.max() == round(63000 / 65535 * 255) and len(np.unique(arr)) > 50
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert (to_array(rgba, 3) == 255).all()  # shows the white behind it, not red
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert abs(int(to_array(half, 1)[0, 0]) - 127) <= 1
    assert to_array(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), 3)[0, 0].tolist() == [255, 0, 255]
    assert to_array(Image.new("P", (4, 4), 0), 3).shape == (4, 4, 3)


def test_channels_come_from_every_file_not_a_sample(tmp_path):
    root = write_images(tmp_path / "imgs", classes=2, per_class=150, mode="L")
    Image.fromarray(np.full((8, 8, 3), (200, 30, 30), np.uint8)).save(root / "class_1" / "img_77.png")  # 1 in 300
    assert load_folder(str(root), None, "memory", tmp_path / "cache", 0).shape[0] == 3


@pytest.fixture
def zoo(tmp_path):
    root = write_images(tmp_path / "imgs", classes=2, per_class=6)
    (root / "class_0" / "empty.png").write_bytes(b"")
    (root / "class_0" / "notes.png").write_text("this is not an image")
    Image.new("RGB", (8, 8)).save(root / "class_1" / "cut.jpg")
    data = (root / "class_1" / "cut.jpg").read_bytes()
    (root / "class_1" / "cut.jpg").write_bytes(data[:20])  # a truncated JPEG header
    bomb = tmp_path / "bomb.png"  # checked on its own: a real bomb would take gigabytes to write
    Image.new("L", (1, 1)).save(bomb)
    return root, bomb


def test_bad_files_are_refused_together_each_with_its_reason(zoo, tmp_path, monkeypatch):
    root, bomb = zoo
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 0)  # makes every image "too large": here, test one
    assert "decompression bomb" in header(bomb)
    monkeypatch.undo()
    with pytest.raises(DataError) as e:
        load_folder(str(root), None, "memory", tmp_path / "cache", 0)
    msg = str(e.value)
    assert "3 of 15 files cannot be used" in msg and "data.bad_files=skip" in msg
    assert "empty.png: empty file" in msg and "notes.png: not a readable image" in msg and "cut.jpg" in msg


def test_bad_files_can_be_skipped_and_are_counted(zoo, tmp_path, caplog):
    root, _ = zoo
    src = load_folder(str(root), None, "memory", tmp_path / "cache", 0, bad_files="skip")
    assert len(src.parts["all"]) == 12 and "left out 3 unusable files" in caplog.text


def test_photos_saved_as_jfif_are_read_and_heic_ones_are_refused_with_what_reads_them(tmp_path):
    """A browser saves JPEGs as .jfif, an iPhone saves .heic: both are listed (not skipped as 'non-image' files,
    which left a class folder of iPhone photos 'holding no images'); the JPEG is read, the HEIC that this Pillow
    cannot open is a bad file whose reason names the fix."""
    try:
        import pillow_heif  # noqa: F401
        pytest.skip("pillow-heif installed: HEIC files are read")
    except ImportError:
        pass
    root = write_images(tmp_path / "imgs", classes=2, per_class=4, size=(32, 32))
    Image.open(next((root / "class_0").iterdir())).save(root / "class_0" / "saved.jfif", "JPEG")
    (root / "class_1" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(DataError) as e:
        load_folder(str(root), None, "memory", tmp_path / "cache", 0)
    assert "IMG_0001.HEIC: an HEIC photo" in str(e.value) and "pip install pillow-heif" in str(e.value)
    src = load_folder(str(root), None, "memory", tmp_path / "cache", 0, bad_files="skip")
    assert "class_0/saved.jfif" in src.parts["all"].ids and len(src.parts["all"]) == 9


def test_names_that_are_not_utf8_are_refused_each_named_with_how_to_rename_them(tmp_path):
    """A zip made on an older Windows extracts 'café.jpg' as the bytes caf\\xe9.jpg: such names could not be written
    to the log or JSON (a UnicodeEncodeError traceback half-way through the data stage). Refused up front, for
    training and for predict, each name shown once."""
    root = write_images(tmp_path / "imgs", classes=2, per_class=4, size=(16, 16))
    try:
        os.rename(next((root / "class_0").iterdir()), os.fsencode(root / "class_0") + b"/caf\xe9.png")
        os.rename(root / "class_1", os.fsencode(root) + b"/gr\xfcn")
    except OSError:
        pytest.skip("this filesystem takes only UTF-8 names")
    with pytest.raises(DataError) as e:
        load_folder(str(root), None, "memory", tmp_path / "cache", 0)
    msg = str(e.value)
    assert "2 file or folder names under" in msg and "b'class_0/caf\\xe9.png'\n" in msg
    assert "b'gr\\xfcn' (a folder of 4 images)" in msg and "convmv -f cp1252 -t utf-8 -r --notest" in msg
    msg.encode("utf-8")  # the message itself can be logged
    from safetrain.inference import image_files
    with pytest.raises(DataError, match="not UTF-8 text"):
        image_files(str(root))


def _cut_after_header(path):
    """A JPEG whose header is whole and whose pixel data stops half-way (a copy interrupted mid-file)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_file_cut_after_its_header_is_found_before_training_listed_and_skippable(tmp_path):
    root = write_images(tmp_path / "imgs", classes=2, per_class=8, size=(64, 64))
    _cut_after_header(root / "class_1" / "cut_body.jpg")
    (root / "class_0" / "empty.png").write_bytes(b"")
    assert not isinstance(header(root / "class_1" / "cut_body.jpg"), str)  # the header alone looks fine
    for loader in ("memory", "stream"):  # a streamed folder is checked in full before training, too
        with pytest.raises(DataError) as e:
            load_folder(str(root), None, loader, tmp_path / "cache", 0)
        assert "2 of 18 files cannot be used" in str(e.value)  # both, in one list
        assert "cut_body.jpg: cannot be decoded" in str(e.value) and "empty.png: empty file" in str(e.value)
        src = load_folder(str(root), None, loader, tmp_path / "cache", 0, bad_files="skip")
        assert len(src.parts["all"]) == 16 and src.left_out["bad"] == {
            "class_0/empty.png": "empty file", "class_1/cut_body.jpg": src.left_out["bad"]["class_1/cut_body.jpg"]}
        assert "truncated" in src.left_out["bad"]["class_1/cut_body.jpg"]


def test_the_files_left_out_are_in_data_facts_and_the_report(tmp_path):
    from safetrain.cli import compose
    from safetrain.run import run

    root = write_images(tmp_path / "imgs", classes=2, per_class=30, size=(64, 64))
    _cut_after_header(root / "class_0" / "cut_body.jpg")
    Image.new("RGB", (64, 64)).save(root / "class_0" / ".hidden.png")
    Image.new("RGB", (64, 64)).save(root / "class_1" / "icon.ico")  # an image format Pillow reads, but not listed
    (root / "class_1" / "notes.txt").write_text("shot on 2026-12-08")
    cfg, _ = compose("smoke", ["data=imagefolder", f"data.root={root}", "data.bad_files=skip", "data.batch_size=8",
                               "trainer.max_epochs=1", "trainer.progress=false", "data.loader=stream"])
    run(cfg, tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "data_facts.json").read_text())
    assert facts["left_out"]["skipped"] == {"hidden": 1, ".ico": 1, ".txt": 1}
    assert list(facts["left_out"]["bad"]) == ["class_0/cut_body.jpg"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "class_0/cut_body.jpg: cannot be decoded" in report and "not images (1 hidden, 1 .ico, 1 .txt)" in report


def test_a_link_to_a_missing_file_is_named_as_one(tmp_path):
    """An image folder copied with its links: the link's target is what is missing, not the file in the folder."""
    os.symlink(tmp_path / "elsewhere" / "cat.jpg", tmp_path / "cat.jpg")
    assert header(tmp_path / "cat.jpg") == f"a link to {tmp_path / 'elsewhere' / 'cat.jpg'}, which does not exist"
    assert header(tmp_path / "dog.jpg") == "no such file"


def test_thumbnails_among_larger_images_are_named(tmp_path, caplog):
    """A 6x6 icon among 40-50 px photos is enlarged 5x: named with its size; images of one size never are."""
    caplog.set_level("INFO", logger="safetrain")
    root = write_images(tmp_path / "imgs", classes=2, per_class=6, size=(40, 40))
    Image.fromarray(np.full((50, 60, 3), 90, dtype=np.uint8)).save(root / "class_0" / "wide.png")
    load_folder(str(root), None, "memory", tmp_path / "cache", 0)
    assert "a quarter of the training size" not in caplog.text  # 40-50 px photos trained at 32
    Image.fromarray(np.full((6, 6, 3), 90, dtype=np.uint8)).save(root / "class_1" / "icon.png")
    load_folder(str(root), None, "memory", tmp_path / "cache", 0)
    assert "1 image(s) are a quarter of the training size (32 px) or less" in caplog.text
    assert "icon.png, 6x6): each is enlarged 5x" in caplog.text


def test_images_of_different_sizes_train_at_a_size_chosen_from_them_in_either_loader(tmp_path, caplog):
    caplog.set_level("INFO", logger="safetrain")
    """No setting needed (the message once suggested the smallest side): the median shorter side within the
    device's bounds (a GPU's here), each image fitted by the same rule (data.resize=crop: aspect kept) in memory,
    streamed, and at inference."""
    from safetrain.data.files import AUTO_SIDE
    root = write_images(tmp_path / "imgs", classes=2, per_class=6, size=(40, 40))
    odd = np.zeros((50, 100, 3), dtype=np.uint8)
    odd[:, 25:75] = 200  # the centre square of a wide image: what crop keeps
    Image.fromarray(odd).save(root / "class_1" / "odd.png")
    memory = load_folder(str(root), None, "memory", tmp_path / "cache", 0, auto_side=AUTO_SIDE["accelerator"])
    stream = load_folder(str(root), None, "stream", tmp_path / "cache", 0, auto_side=AUTO_SIDE["accelerator"])
    assert memory.shape == stream.shape == (3, 40, 40) and memory.resize == Fit((40, 40), "crop")
    assert "the images have 2 sizes (shorter side 40 to 50 px, median 40); training at 40x40" in caplog.text
    on_cpu = load_folder(str(root), None, "memory", tmp_path / "cache", 0)  # what 2 CPU cores afford: 32 px
    assert on_cpu.shape == (3, 32, 32) and "training at 32x32, their median within 24-32 px" in caplog.text
    i = memory.parts["all"].ids.index("class_1/odd.png")
    kept = memory.parts["all"].images[i]
    assert kept.float().mean() > 190  # the bright centre, not the black sides squashed in
    j = stream.parts["all"].files.index(str(root / "class_1" / "odd.png"))
    torch.testing.assert_close(decode_image(stream.parts["all"].files[j], 3, stream.resize), kept)


def test_photos_are_decoded_upright_as_their_exif_orientation_says(tmp_path):
    """A phone stores a portrait photo sideways with an EXIF orientation tag that every viewer applies: safetrain
    applies it too (the header's size, the decode, the resized decode, a folder in memory), so one scene stored
    upright or turned/mirrored with its tag decodes to the same pixels."""
    scene = np.zeros((96, 64, 3), np.uint8)
    scene[:48, :, 0] = 255  # red top, blue bottom, a green left edge: every turn and mirror tells
    scene[48:, :, 2] = 255
    scene[:, :8, 1] = 255
    T = Image.Transpose
    stored_as = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
                 7: T.TRANSVERSE, 8: T.ROTATE_270}  # how a camera's pixels sit for each tag (the inverse turn)
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    Image.fromarray(scene).save(root / "a" / "upright.jpg", quality=95)
    for tag, turn in stored_as.items():
        exif = Image.Exif()
        exif[0x0112] = tag
        Image.fromarray(scene).transpose(turn).save(root / "b" / f"tag{tag}.jpg", quality=95, exif=exif)
        if tag == 6:  # PNG (eXIf chunk), WebP and TIFF (whose reader applies the tag itself) carry it too
            for name, extra in (("tag6.png", {}), ("tag6.webp", {"lossless": True}), ("tag6.tif", {})):
                Image.fromarray(scene).transpose(turn).save(root / "b" / name, exif=exif, **extra)
    fit = Fit((48, 48), "crop")
    want, want_small = decode_image(str(root / "a" / "upright.jpg"), 3, None), decode_image(
        str(root / "a" / "upright.jpg"), 3, fit)
    for path in sorted((root / "b").iterdir()):
        tag = path.name
        assert header(path) == ("RGB", (96, 64)), tag
        for got, ref in ((decode_image(str(path), 3, None), want), (decode_image(str(path), 3, fit), want_small)):
            assert got.shape == ref.shape and (got.float() - ref.float()).abs().mean() < 3, tag
    images = load_folder(str(root), None, "memory", tmp_path / "cache", 0).parts["all"].images
    assert images.shape[1:] == (3, 96, 64)  # every file the upright size: nothing resized
    assert (images.float() - images[0].float()).abs().mean((1, 2, 3)).max() < 3


def test_fit_image_crops_pads_or_squashes():
    arr = np.arange(20 * 40, dtype=np.float64).reshape(20, 40) % 256
    arr = arr.astype(np.uint8)
    assert fit_image(arr, Fit((10, 10), "crop")).shape == (10, 10)
    padded = fit_image(np.full((20, 40), 255, np.uint8), Fit((10, 10), "pad"))
    assert padded.shape == (10, 10) and padded[:2].max() == 0 and padded[8:].max() == 0 and padded[3:7].min() == 255
    assert fit_image(np.full((20, 40), 255, np.uint8), Fit((10, 10), "squash")).min() == 255
    assert fit_image(arr, Fit((20, 40), "crop")) is arr  # the size already: untouched


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_is_decoded_straight_to_about_the_size_used(tmp_path, fmt):
    """JPEG's DCT scaling (draft) or a whole-factor reduce before the exact resize: the pixels a full decode and
    resize would give, to within a few levels, without computing most of the large image."""
    from safetrain.data.files import shrink_on_load

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).resize((1800, 1200), Image.BICUBIC)
    path = tmp_path / f"big.{fmt.lower()}"
    big.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    fit = Fit((64, 64), "crop")
    with Image.open(path) as im:
        small = shrink_on_load(im, fit)
        small.load()
        assert 96 <= small.size[0] < 900 and 64 <= small.size[1] < 600  # reduced, never below what the crop needs
    with Image.open(path) as im:
        full = fit_image(to_array(im, 3), fit)
    ours = decode_image(str(path), 3, fit).permute(1, 2, 0).numpy()
    assert np.abs(ours.astype(int) - full.astype(int)).mean() < 2


def test_the_decompression_bomb_limit_is_a_setting_the_refusal_names(tmp_path):
    from safetrain.cli import compose
    from safetrain.config import data_spec
    from safetrain.data.files import pixel_limit
    big = tmp_path / "big.png"
    Image.new("L", (2000, 1000)).save(big)  # 2 megapixels
    try:
        pixel_limit(1_500_000)
        why = header(big)
        assert "more than 1,500,000 pixels" in why and "data.max_image_pixels=N" in why
        pixel_limit(2_500_000)  # a user who trusts the file raises the limit
        assert header(big) == ("L", (1000, 2000))
    finally:
        pixel_limit(None)
    assert header(big) == ("L", (1000, 2000))  # PIL's own limit again
    cfg = compose("imagefolder", [f"data.root={tmp_path}", "data.max_image_pixels=200000000"])[0]
    assert data_spec(cfg).max_image_pixels == 200_000_000  # carried to loading, and in the checkpoints' spec


@pytest.mark.parametrize("mode", ["P", "P+transparency", "1", "I;16", "LA", "RGBA", "L", "CMYK"])
def test_large_images_of_every_mode_decode_straight_to_the_training_size(tmp_path, mode):
    """A real folder mixes palette, bilevel, 16-bit, gray+alpha files: each large one is shrunk on load (PIL
    reduces no palette image: the palette is applied first) to about what a full decode then resize gives."""
    from safetrain.data.files import Fit, fit_image, to_array
    from safetrain.data.sources import _decode
    g = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(g.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((400, 300), Image.BICUBIC))
    im = Image.fromarray(smooth)
    im = {"P+transparency": lambda: im.convert("P"), "I;16": lambda: im.convert("L").convert("I;16")}.get(
        mode, lambda: im.convert(mode))()
    if mode == "P+transparency":
        im.info["transparency"] = 0
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    fit = Fit((32, 32), "crop")
    ours = _decode(str(path), 3, fit).permute(1, 2, 0).numpy().astype(float)
    with Image.open(path) as full:
        want = fit_image(to_array(full, 3), fit).astype(float)
    limit = 40 if mode == "1" else 10  # bilevel: dithered; others: a box filter (reduce, JPEG's DCT scaling) before
    # the resize, at 32 px: a few levels where colours change fast (a wrong or shifted image differs by ~60)
    assert ours.shape == (32, 32, 3) and np.abs(ours - want).mean() < limit
