from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_impls.data.office import domains, split


def write_images(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(folder / f"frame_{i}.jpg")


def test_office31_layout_with_images_subfolder(tmp_path):
    write_images(tmp_path / "amazon" / "images" / "bike", 2)
    write_images(tmp_path / "amazon" / "images" / "mug", 1)
    write_images(tmp_path / "dslr" / "images" / "mug", 3)
    write_images(tmp_path / "webcam" / "images" / "calculator", 1)
    sets, classes = domains(tmp_path, size=4)
    assert classes == ["bike", "calculator", "mug"]  # shared indices across domains
    assert [len(sets[d]) for d in ("amazon", "dslr", "webcam")] == [3, 3, 1]
    assert {label for _, label in sets["dslr"]} == {2}
    image, label = sets["webcam"][0]
    assert image.shape == (3, 4, 4) and label == 1
    train, test = split(sets["amazon"], test_fraction=1 / 3, seed=0)
    assert len(train) == 2 and len(test) == 1


def test_office_home_layout_and_error(tmp_path):
    write_images(tmp_path / "Art" / "Alarm_Clock", 1)
    sets, classes = domains(tmp_path, names=("Art",), size=4)
    assert classes == ["Alarm_Clock"] and len(sets["Art"]) == 1
    with pytest.raises(FileNotFoundError, match="Clipart") as info:
        domains(tmp_path, names=("Art", "Clipart"))
    assert "expected layout" in str(info.value)


def test_office_reads_image_suffixes_in_any_case_in_file_name_order(tmp_path, monkeypatch):
    classes_folder = tmp_path / "amazon" / "images"
    write_images(classes_folder / "mug", 2)  # frame_0.jpg, frame_1.jpg
    for name in ("a.Jpg", "b.PNG", "c.JPEG"):
        Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(classes_folder / "mug" / name)
    (classes_folder / "mug" / "notes.txt").write_text("not an image")
    (classes_folder / "README.txt").write_text("a file beside the class folders is not a class")
    listed = Path.iterdir  # the file system's order is arbitrary: list it backwards
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listed(self), reverse=True)))
    sets, classes = domains(tmp_path, names=("amazon",), size=4)
    assert classes == ["mug"]
    assert [path.name for path, _ in sets["amazon"].items] == ["a.Jpg", "b.PNG", "c.JPEG", "frame_0.jpg", "frame_1.jpg"]


def test_office_domain_without_images_shows_the_layout(tmp_path):
    (tmp_path / "Art" / "Mug").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as raised:
        domains(tmp_path, names=("Art",))
    assert str(raised.value).startswith(f"no images under {tmp_path / 'Art'}\nexpected layout:\n")


def test_office_split_is_a_seeded_shuffle_with_a_rounded_test_share(tmp_path):
    write_images(tmp_path / "Art" / "Mug", 5)
    data = domains(tmp_path, names=("Art",), size=4)[0]["Art"]
    train, test = split(data, test_fraction=0.3, seed=2)
    assert len(test) == 2 and sorted(train.indices + test.indices) == list(range(5))  # round(1.5) = 2 held out
    assert split(data, 0.3, seed=2)[1].indices == test.indices
    assert len({tuple(split(data, 0.3, seed=s)[1].indices) for s in range(8)}) > 1  # the seed shuffles
