import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reference_impls.data import DataError, load
from reference_impls.data.celeba import CelebA, binary_loss

NAMES = [f"Attr_{k}" for k in range(40)]


def write_celeba(root, files_and_splits):
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k, (name, _) in enumerate(files_and_splits):
        pixels = np.full((12, 10, 3), 40 * k, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / name)
        values = rng.choice([-1, 1], size=40)
        rows.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
    (root / "list_attr_celeba.txt").write_text(
        f"{len(rows)}\n" + " ".join(NAMES) + "\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n} {s}\n" for n, s in files_and_splits))
    return rows


def test_celeba_layout(tmp_path):
    rows = write_celeba(tmp_path, [("000001.jpg", 0), ("000002.jpg", 2), ("000003.jpg", 0), ("000004.jpg", 1)])
    bench = load("celeba", tmp_path, size=8)
    assert bench.problem.tasks == tuple(NAMES) and bench.problem.input_shape == (3, 8, 8)
    assert len(bench.train) == 2 and len(bench.test) == 1
    image, labels = bench.train[1]  # 000003.jpg, filled with value 80
    assert image.shape == (3, 8, 8)
    assert image.mean().item() == pytest.approx(80 / 255, abs=0.02)
    expected = [1 if int(v) > 0 else 0 for v in rows[2].split()[1:]]
    assert [labels[n].item() for n in NAMES] == expected


def test_celeba_missing_files_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt") as info:
        load("celeba", tmp_path)
    assert "img_align_celeba" in str(info.value)


FILES = [("000001.jpg", 0), ("000002.jpg", 2), ("000003.jpg", 0), ("000004.jpg", 1)]
ATTRIBUTES, PARTITION = "list_attr_celeba.txt", "list_eval_partition.txt"


def edit_line(path, number, text):
    """Replace line ``number`` (1-based) of ``path`` with ``text``."""
    lines = path.read_text().split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines))


def raises_at(root, file, line, *words):
    """Opening the benchmark raises DataError starting with 'file:line: ' and naming ``words``."""
    with pytest.raises(DataError) as raised:
        load("celeba", root, size=8)
    message = str(raised.value)
    assert message.startswith(f"{root / file}:{line}: "), message
    for word in words:
        assert word in message, message
    return message


def test_celeba_valid_files_with_crlf_and_trailing_blank_lines_still_load(tmp_path):
    write_celeba(tmp_path, FILES)
    for name in (ATTRIBUTES, PARTITION):
        path = tmp_path / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n") + b"\r\n\n")
    bench = load("celeba", tmp_path, size=8)
    assert len(bench.train) == 2 and len(bench.test) == 1


@pytest.mark.parametrize("first", ["many", "", "-4", "4.0", "²"])  # "²".isdigit(), but int("²") fails
def test_celeba_count_line_must_be_a_whole_number(tmp_path, first):
    write_celeba(tmp_path, FILES)
    edit_line(tmp_path / ATTRIBUTES, 1, first)
    raises_at(tmp_path, ATTRIBUTES, 1, "expected the number of images", repr(first))


@pytest.mark.parametrize("count", [5, 3])
def test_celeba_count_must_match_the_image_lines(tmp_path, count):
    write_celeba(tmp_path, FILES)  # 4 image lines; 3 used to read the first 3 and drop the 4th
    edit_line(tmp_path / ATTRIBUTES, 1, str(count))
    raises_at(tmp_path, ATTRIBUTES, 1, f"announces {count} images", "4 image lines")


def test_celeba_attribute_names_must_be_present_and_distinct(tmp_path):
    write_celeba(tmp_path, FILES)
    edit_line(tmp_path / ATTRIBUTES, 2, "   ")
    raises_at(tmp_path, ATTRIBUTES, 2, "expected the attribute names")
    edit_line(tmp_path / ATTRIBUTES, 2, " ".join(NAMES[:-1] + ["Attr_3"]))
    raises_at(tmp_path, ATTRIBUTES, 2, "distinct", "Attr_3")


@pytest.mark.parametrize("values", [39, 41, 0])
def test_celeba_attribute_line_needs_a_file_and_40_values(tmp_path, values):
    write_celeba(tmp_path, FILES)
    edit_line(tmp_path / ATTRIBUTES, 4, " ".join(["000002.jpg"] + ["1"] * values))
    raises_at(tmp_path, ATTRIBUTES, 4, "a file name and 40 values of -1 or 1", f"got {values + 1} fields")


@pytest.mark.parametrize("value", ["0", "2", "x", "+1", "1.0"])
def test_celeba_attribute_values_must_be_minus_one_or_one(tmp_path, value):
    rows = write_celeba(tmp_path, FILES)
    parts = rows[2].split()
    parts[6] = value  # the 6th attribute, Attr_5
    edit_line(tmp_path / ATTRIBUTES, 5, " ".join(parts))
    raises_at(tmp_path, ATTRIBUTES, 5, "expected -1 or 1 for Attr_5", repr(value))


def test_celeba_attribute_file_names_must_be_unique(tmp_path):
    rows = write_celeba(tmp_path, FILES)
    edit_line(tmp_path / ATTRIBUTES, 6, rows[3].replace("000004.jpg", "000002.jpg"))
    raises_at(tmp_path, ATTRIBUTES, 6, "000002.jpg is listed twice", "line 4")


def test_celeba_label_file_that_is_not_text(tmp_path):
    write_celeba(tmp_path, FILES)
    (tmp_path / ATTRIBUTES).write_bytes(b"4\n\xff\xfe\x00binary")
    with pytest.raises(DataError, match="expected a text file") as raised:
        load("celeba", tmp_path, size=8)
    assert str(raised.value).startswith(f"{tmp_path / ATTRIBUTES}: ")


@pytest.mark.parametrize("line", ["000002.jpg", "000002.jpg 2 2", "000002.jpg test", "000002.jpg 3",
                                  "000002.jpg -1"])
def test_celeba_partition_lines_are_a_file_and_0_1_or_2(tmp_path, line):
    write_celeba(tmp_path, FILES)  # a split of 3 used to put the file in no split, silently
    edit_line(tmp_path / PARTITION, 2, line)
    raises_at(tmp_path, PARTITION, 2, "expected '<file> <split>'", "0 (train), 1 (val) or 2 (test)", repr(line))


def test_celeba_partition_file_names_must_be_unique(tmp_path):
    write_celeba(tmp_path, FILES)
    edit_line(tmp_path / PARTITION, 4, "000001.jpg 1")
    raises_at(tmp_path, PARTITION, 4, "000001.jpg is listed twice", "line 1")


def test_celeba_partition_file_without_attributes_names_the_partition_line(tmp_path):
    write_celeba(tmp_path, FILES)
    with (tmp_path / PARTITION).open("a") as partition:
        partition.write("000009.jpg 0\n000010.jpg 0\n")
    raises_at(tmp_path, PARTITION, 5, "000009.jpg has no line in list_attr_celeba.txt",
              "2 of the train split")


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"not an image"], ids=["truncated", "garbage"])
def test_a_damaged_image_is_named_when_read(tmp_path, damage):
    """Pillow's message for a truncated JPEG ("image file is truncated") does not say which file."""
    write_celeba(tmp_path, FILES)
    image = tmp_path / "img_align_celeba" / "000003.jpg"
    image.write_bytes(damage(image.read_bytes()))
    bench = load("celeba", tmp_path, size=8)
    bench.train[0]
    with pytest.raises(DataError, match=rf"^{re.escape(str(image))}: not a readable image"):
        bench.train[1]


def test_celeba_splits_are_0_train_1_val_2_test_and_the_test_split_is_chosen(tmp_path):
    write_celeba(tmp_path, FILES)
    assert [CelebA(tmp_path, split, size=8).files for split in ("train", "val", "test")] == [
        ["000001.jpg", "000003.jpg"], ["000004.jpg"], ["000002.jpg"]]
    assert load("celeba", tmp_path, size=8).test.files == ["000002.jpg"]  # the official test split by default
    assert load("celeba", tmp_path, size=8, test_split="val").test.files == ["000004.jpg"]


def test_celeba_image_is_rgb_channels_first_in_zero_to_one(tmp_path):
    """A grayscale file (Pillow reads by content: PNG bytes under the .jpg name, so pixels are exact)."""
    write_celeba(tmp_path, FILES)
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:, 5:] = 255  # right columns white
    pixels[0, 0] = 51  # one grey pixel, top left
    Image.fromarray(pixels, mode="L").save(tmp_path / "img_align_celeba" / "000001.jpg", format="PNG")
    image, labels = load("celeba", tmp_path, size=8).train[0]
    expected = torch.from_numpy(pixels / 255.0).float().expand(3, 8, 8)
    assert image.dtype == torch.float32 and torch.equal(image, expected)
    assert all(label.dtype == torch.long for label in labels.values())


def test_celeba_tasks_are_binary_cross_entropy_on_one_logit_and_accuracy(tmp_path):
    write_celeba(tmp_path, FILES)
    spec = load("celeba", tmp_path, size=8).tasks["Attr_0"]
    assert spec.loss is binary_loss and spec.metric().name == "accuracy"
    by_hand = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2  # logit 2 for 1, -1 for 0
    assert binary_loss(torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 0])).item() == pytest.approx(by_hand)


def test_celeba_trailing_whitespace_only_lines_are_not_images(tmp_path):
    write_celeba(tmp_path, FILES)
    with (tmp_path / ATTRIBUTES).open("a") as attributes:
        attributes.write("   \n\t\n")
    assert len(load("celeba", tmp_path, size=8).train) == 2


def test_an_image_listed_but_absent_is_named_at_its_partition_line_on_opening(tmp_path):
    """It used to surface as a FileNotFoundError traceback when the loop reached it."""
    write_celeba(tmp_path, FILES)
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    raises_at(tmp_path, PARTITION, 3, f"000003.jpg is not in {tmp_path / 'img_align_celeba'}",
              "1 of the train split")
    assert CelebA(tmp_path, "val", size=8).files == ["000004.jpg"]  # only the train split lacks one


def test_the_official_drive_layout_reads_the_same_data_as_the_flat_one(tmp_path):
    flat, drive = tmp_path / "flat", tmp_path / "drive"
    write_celeba(flat, FILES)
    for source, target in (("list_attr_celeba.txt", "Anno/list_attr_celeba.txt"),
                           ("list_eval_partition.txt", "Eval/list_eval_partition.txt"),
                           ("img_align_celeba", "Img/img_align_celeba")):
        (drive / target).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (flat / source).is_dir() else shutil.copyfile
        copy(flat / source, drive / target)
    a, b = load("celeba", flat, size=8), load("celeba", drive, size=8)
    assert a.train.files == b.train.files and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.train[1][0], b.train[1][0])


@pytest.mark.parametrize("options, message", [
    ({"test_split": "foo"}, "test_split must be val or test, got 'foo'"),  # was a bare KeyError: 'foo'
    ({"test_split": "train"}, "test_split must be val or test, got 'train'"),
    ({"size": 0}, "size must be at least 1"),  # was blamed on the first image, as unreadable
])
def test_options_the_loader_cannot_use_are_refused_by_name(tmp_path, options, message):
    write_celeba(tmp_path, FILES)
    with pytest.raises(ValueError, match=message) as raised:
        load("celeba", tmp_path, **options)
    assert not isinstance(raised.value, DataError)


def test_a_missing_label_file_is_reported_at_its_flat_path(tmp_path):
    """Both layouts are read, but the error names the flat (torchvision) path, as ``locate`` documents."""
    with pytest.raises(FileNotFoundError) as raised:
        load("celeba", tmp_path)
    assert str(raised.value).startswith(f"missing {tmp_path / ATTRIBUTES}\n"), str(raised.value)


@pytest.mark.parametrize("text, line, words", [
    ("4", 2, ["attribute names"]),  # no line 2 at all: a DataError at line 2, not an IndexError
    ("4\n" + " ".join(NAMES), 1, ["announces 4 images, but 0"]),  # line 2 present, no image lines
])
def test_an_attribute_file_cut_short_is_a_data_error_at_the_missing_part(tmp_path, text, line, words):
    write_celeba(tmp_path, FILES)
    (tmp_path / ATTRIBUTES).write_text(text)  # no final newline: the file ends on the last line shown
    raises_at(tmp_path, ATTRIBUTES, line, *words)


def test_a_blank_line_inside_the_partition_file_is_skipped_not_its_end(tmp_path):
    """Only non-blank lines are rows: the lines after a blank one still belong to their splits."""
    write_celeba(tmp_path, FILES)
    edit_line(tmp_path / PARTITION, 1, "000001.jpg 0\n")
    assert [CelebA(tmp_path, split, size=8).files for split in ("train", "val", "test")] == [
        ["000001.jpg", "000003.jpg"], ["000004.jpg"], ["000002.jpg"]]


def test_an_image_removed_after_opening_is_a_missing_file_that_shows_the_layout(tmp_path):
    write_celeba(tmp_path, FILES)
    dataset = CelebA(tmp_path, "train", size=8)
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(FileNotFoundError) as raised:
        dataset[1]
    assert "expected layout:" in str(raised.value) and "list_eval_partition.txt" in str(raised.value)


def test_celeba_defaults_to_the_training_split_and_refuses_an_unknown_one(tmp_path):
    write_celeba(tmp_path, FILES)
    assert CelebA(tmp_path, size=8).files == CelebA(tmp_path, "train", size=8).files == ["000001.jpg", "000003.jpg"]
    with pytest.raises(ValueError, match="got 'validation'") as raised:
        CelebA(tmp_path, "validation", size=8)
    assert not isinstance(raised.value, DataError)


def test_every_split_is_resized_to_size_down_to_one_pixel_and_each_attribute_has_one_logit(tmp_path):
    """``size`` reaches the test split too, 1 pixel is allowed ("at least 1"), and the problem
    gives each attribute the one logit its binary cross-entropy reads."""
    write_celeba(tmp_path, FILES)
    for size in (1, 5):
        bench = load("celeba", tmp_path, size=size)
        assert bench.problem.input_shape == (3, size, size)
        assert bench.train[0][0].shape == bench.test[0][0].shape == (3, size, size)
    assert bench.problem.out_dims == {name: 1 for name in NAMES}
    image = CelebA(tmp_path, "train", size=1)[1][0]  # a uniform image stays its value when shrunk
    assert image.shape == (3, 1, 1) and image.flatten().tolist() == pytest.approx([80 / 255] * 3, abs=0.02)
