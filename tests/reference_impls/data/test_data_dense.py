import re

import numpy as np
import pytest
import torch

from reference_impls.data import DataError, load
from reference_impls.data.dense import DenseNpy, depth_loss, normal_loss, segmentation_loss


def write_split(root, split, n, h, w, label_folder, classes, normals):
    rng = np.random.default_rng(0)
    for folder in ["image", label_folder, "depth"] + (["normal"] if normals else []):
        (root / split / folder).mkdir(parents=True)
    for i in range(n):
        np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3)).astype(np.float32))
        label = rng.integers(-1, classes, size=(h, w)).astype(np.float32)
        np.save(root / split / label_folder / f"{i}.npy", label)
        depth = rng.random((h, w, 1)).astype(np.float32)
        depth[0, 0, 0] = 0.0  # a missing measurement
        np.save(root / split / "depth" / f"{i}.npy", depth)
        if normals:
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            np.save(root / split / "normal" / f"{i}.npy", normal / np.linalg.norm(normal, axis=-1, keepdims=True))


def test_nyuv2_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        write_split(tmp_path, split, n, 6, 8, "label", 13, normals=True)
    bench = load("nyuv2", tmp_path)
    assert bench.problem.tasks == ("segmentation", "depth", "normal")
    assert bench.problem.input_shape == (3, 6, 8) and bench.problem.dense
    assert bench.problem.out_dims == {"segmentation": 13, "depth": 1, "normal": 3}
    assert len(bench.train) == 3 and len(bench.test) == 2
    image, targets = bench.train[1]
    raw = np.load(tmp_path / "train" / "image" / "1.npy")
    torch.testing.assert_close(image, torch.from_numpy(np.moveaxis(raw, -1, 0)))
    label = np.load(tmp_path / "train" / "label" / "1.npy")
    assert targets["segmentation"].dtype == torch.long
    assert torch.equal(targets["segmentation"], torch.from_numpy(label.astype(np.int64)))
    assert targets["depth"].shape == (1, 6, 8) and targets["normal"].shape == (3, 6, 8)


@pytest.mark.parametrize("n, size, h, w", [(2, (6, 8), 3, 4), (3, (7, 8), 2, 2), (1, (6, 8), 6, 8),
                                           (3, (8, 11), 2, 3)])  # remainders of 2 > N // 2: a centre at row 7
def test_downsample_averages_image_blocks_and_takes_each_targets_block_centre(tmp_path, n, size, h, w):
    """Class ids and missing depths must not be blended: targets keep the pixel at (N//2, N//2)
    of each block; a remainder of rows or columns is dropped."""
    for split, count in (("train", 2), ("val", 1)):
        write_split(tmp_path, split, count, *size, "label", 13, normals=True)
    bench = load("nyuv2", tmp_path, downsample=n)
    assert bench.problem.input_shape == (3, h, w)
    image, targets = bench.train[1]
    raw = {f: np.load(tmp_path / "train" / f / "1.npy") for f in ("image", "label", "depth", "normal")}
    for i, j in ((0, 0), (h - 1, w - 1), (h // 2, 0)):
        block = raw["image"][i * n:(i + 1) * n, j * n:(j + 1) * n]
        torch.testing.assert_close(image[:, i, j], torch.from_numpy(block.mean(axis=(0, 1))).float())
        centre = (i * n + n // 2, j * n + n // 2)
        assert targets["segmentation"][i, j] == int(raw["label"][centre])
        assert targets["depth"][0, i, j] == raw["depth"][centre][0]
        torch.testing.assert_close(targets["normal"][:, i, j], torch.from_numpy(raw["normal"][centre]))
    assert targets["depth"].shape == (1, h, w) and targets["normal"].shape == (3, h, w)
    assert bench.test[0][0].shape == (3, h, w)


def test_downsample_below_one_or_beyond_the_image_is_refused(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        write_split(tmp_path, split, count, 4, 6, "label_7", 7, normals=False)
    with pytest.raises(ValueError, match="downsample must be at least 1"):
        load("cityscapes", tmp_path, downsample=0)
    with pytest.raises(DataError, match=r"image/0.npy: downsample=5 leaves no pixel of a 4 x 6 image"):
        load("cityscapes", tmp_path, downsample=5)
    assert load("cityscapes", tmp_path, downsample=4).problem.input_shape == (3, 1, 1)


def test_cityscapes_layout_and_missing_folder_message(tmp_path):
    write_split(tmp_path, "train", 2, 4, 8, "label_7", 7, normals=False)
    with pytest.raises(FileNotFoundError, match=r"label_7") as info:
        load("cityscapes", tmp_path)  # no val split yet
    assert "expected layout" in str(info.value) and "val" in str(info.value)
    write_split(tmp_path, "val", 1, 4, 8, "label_7", 7, normals=False)
    bench = load("cityscapes", tmp_path)
    assert bench.problem.tasks == ("segmentation", "depth")
    assert bench.problem.out_dims["segmentation"] == 7


def test_dense_losses_skip_unlabelled_pixels():
    target = torch.tensor([[[[0.0, 2.0]]]])  # first pixel has no depth
    assert depth_loss(torch.tensor([[[[100.0, 1.5]]]]), target).item() == pytest.approx(0.5)
    normals = torch.zeros(1, 3, 1, 2)
    normals[0, 2, 0, 1] = 1.0  # only the second pixel is labelled
    prediction = torch.zeros(1, 3, 1, 2)
    prediction[0, 0, 0, 0] = 1.0
    prediction[0, 2, 0, 1] = 5.0  # aligned with its target after normalisation
    assert normal_loss(prediction, normals).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss, target", [
    (segmentation_loss, -torch.ones(2, 3, 4)),  # every pixel ignored (-1)
    (depth_loss, torch.zeros(2, 1, 3, 4)),  # no depth
    (normal_loss, torch.zeros(2, 3, 3, 4)),  # no normal
])
def test_a_batch_without_labels_adds_zero_loss_and_zero_gradient(loss, target):
    prediction = torch.randn(2, 3, 3, 4, requires_grad=True)
    value = loss(prediction, target)
    value.backward()
    assert value.item() == 0.0 and prediction.grad is not None and not prediction.grad.any()


def nyuv2(root):
    for split, n in (("train", 3), ("val", 2)):
        write_split(root, split, n, 4, 6, "label", 13, normals=True)
    return root / "train"


@pytest.mark.parametrize("damage, where, says", [
    (lambda t: (t / "depth" / "2.npy").unlink(), "depth/2.npy", "expected one file per image, 3 in image/, found 2"),
    (lambda t: (t / "image" / "1.npy").rename(t / "image" / "7.npy"), "image/1.npy", "missing; files must be numbered 0 .. n-1"),
    (lambda t: np.save(t / "image" / "extra.npy", np.zeros(1)), "image/extra.npy", "files must be named 0.npy, 1.npy"),
    (lambda t: (t / "label" / "0.npy").write_bytes(b"not numpy"), "label/0.npy", "not a valid .npy file"),
    (lambda t: np.save(t / "image" / "0.npy", np.zeros((3, 4, 6))), "image/0.npy", "expected an (H, W, 3) RGB image, got shape (3, 4, 6)"),
    (lambda t: np.save(t / "depth" / "0.npy", np.zeros((4, 6))), "depth/0.npy", "expected shape (4, 6, 1) to match image 0, got (4, 6)"),
    (lambda t: np.save(t / "normal" / "0.npy", np.zeros((6, 4, 3))), "normal/0.npy", "expected shape (4, 6, 3)"),
    (lambda t: np.save(t / "label" / "0.npy", np.full((4, 6), 13.0)), "label/0.npy", "class ids must be integers from -1 to 12, found 13.0 (24 pixels)"),
    (lambda t: np.save(t / "label" / "0.npy", np.full((4, 6), 0.5)), "label/0.npy", "found 0.5"),
    (lambda t: np.save(t / "image" / "0.npy", np.full((4, 6, 3), np.nan)), "image/0.npy", "holds 72 non-finite value(s)"),
    (lambda t: np.save(t / "depth" / "0.npy", np.full((4, 6, 1), np.inf)), "depth/0.npy", "holds 24 non-finite value(s)"),
    (lambda t: np.save(t / "normal" / "0.npy", np.full((4, 6, 3), np.nan)), "normal/0.npy", "(NaN or inf)"),
    (lambda t: np.save(t / "depth" / "0.npy", np.zeros((4, 6, 1), np.complex64)), "depth/0.npy",
     "expected real numbers, got dtype complex64"),
])
def test_a_malformed_file_is_named_when_the_data_is_opened(tmp_path, damage, where, says):
    """Checked before any training: the file lists, and the first item of each split."""
    damage(nyuv2(tmp_path))
    with pytest.raises(DataError) as raised:
        load("nyuv2", tmp_path)
    message = str(raised.value)
    assert message.startswith(str(tmp_path / "train" / where) + ": ") and says in message


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_later_item_of_the_wrong_shape_is_named_when_the_data_is_opened(tmp_path, split):
    """Every file's header is read on opening: a bad shape late in the validation split used to
    surface only when the trained model was evaluated, losing the run."""
    nyuv2(tmp_path)
    np.save(tmp_path / split / "depth" / "1.npy", np.zeros((4, 5, 1)))
    with pytest.raises(DataError, match=rf"{split}/depth/1\.npy: expected shape \(4, 6, 1\) to match image 1"):
        load("nyuv2", tmp_path)


def test_one_image_of_another_size_is_named_when_the_data_is_opened(tmp_path):
    # it used to pass here and fail in the batch's torch.stack, with no file named
    root = nyuv2(tmp_path)
    for folder, array in (("image", np.zeros((5, 6, 3))), ("label", np.zeros((5, 6))), ("depth", np.ones((5, 6, 1))),
                          ("normal", np.ones((5, 6, 3)))):
        np.save(root / folder / "2.npy", array)
    with pytest.raises(DataError, match=r"train/image/2\.npy: expected an image of 4 x 6 like image 0, got 5 x 6"):
        load("nyuv2", tmp_path)


def test_an_image_of_0_255_integers_is_named_when_the_data_is_opened(tmp_path):
    # it used to be read as floats up to 255, 255 times the layout's [0, 1], without a word
    np.save(nyuv2(tmp_path) / "image" / "2.npy", np.full((4, 6, 3), 200, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train/image/2\.npy: expected float RGB values in \[0, 1\], got dtype uint8"):
        load("nyuv2", tmp_path)


def test_a_truncated_later_file_is_named_when_the_data_is_opened(tmp_path):
    path = nyuv2(tmp_path) / "normal" / "2.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"train/normal/2\.npy: not a readable \.npy array"):
        load("nyuv2", tmp_path)


@pytest.mark.parametrize("content", [b"garbage\n", b"", b"\x93NUM"], ids=["text", "empty", "cut-signature"])
def test_a_file_that_is_no_npy_file_is_named_without_numpy_s_hint_to_unpickle_it(tmp_path, content):
    """np.load takes a file without the .npy signature for a pickle: the message was numpy's
    'contains pickled (object) data... load it unsafely using allow_pickle=', for a text file."""
    path = nyuv2(tmp_path) / "depth" / "1.npy"
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        load("nyuv2", tmp_path)
    assert str(raised.value) == (f"{path}: not a valid .npy file (it does not start with the .npy signature; "
                                 "numpy.save writes one)")


def test_nan_in_a_later_item_is_named_when_it_is_read(tmp_path):
    # it used to stop the run as 'diverged (try a smaller --lr)'; values are read only per item
    np.save(nyuv2(tmp_path) / "depth" / "2.npy", np.full((4, 6, 1), np.nan))
    bench = load("nyuv2", tmp_path)
    bench.train[1]
    with pytest.raises(DataError, match=r"train/depth/2\.npy: holds 24 non-finite"):
        bench.train[2]


def test_validation_images_of_another_size_than_the_training_images_are_refused(tmp_path):
    write_split(tmp_path, "train", 2, 4, 6, "label", 13, normals=True)
    write_split(tmp_path, "val", 2, 8, 6, "label", 13, normals=True)
    with pytest.raises(DataError, match=r"val/image/0\.npy: validation images are 8 x 6, training images 4 x 6"):
        load("nyuv2", tmp_path)


def test_cityscapes_as_libmtl_ships_it_reads_the_label_folder(tmp_path):
    """LibMTL's copy of MTAN's Cityscapes ("cityscapes2") names the 7-class folder label/."""
    for split, n in (("train", 2), ("val", 1)):
        write_split(tmp_path, split, n, 4, 8, "label", 7, normals=False)
    bench = load("cityscapes", tmp_path)
    assert bench.problem.out_dims["segmentation"] == 7
    label = np.load(tmp_path / "train" / "label" / "1.npy")
    assert torch.equal(bench.train[1][1]["segmentation"], torch.from_numpy(label.astype(np.int64)))


def test_cityscapes_label_19_has_19_classes_without_saying_so(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        write_split(tmp_path, split, n, 4, 8, "label_19", 19, normals=False)
    assert load("cityscapes", tmp_path, label_folder="label_19").problem.out_dims["segmentation"] == 19


def test_the_training_command_reports_a_file_broken_mid_run_in_one_line(tmp_path):
    import subprocess
    import sys

    np.save(nyuv2(tmp_path) / "normal" / "2.npy", np.full((4, 6, 3), np.inf))  # found only when item 2 is read
    run = subprocess.run([sys.executable, "-m", "reference_impls.train", "--arch", "shared_bottom", "--data", "nyuv2",
                          "--root", str(tmp_path), "--epochs", "1", "--batch-size", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {tmp_path / 'train' / 'normal' / '2.npy'}: holds 72 non-finite value(s)")


def test_arrays_become_float32_channels_first_copies_of_the_files(tmp_path):
    root = nyuv2(tmp_path)
    for folder in ("image", "depth", "normal"):  # float64 files (np.save's default) still give float32 tensors
        np.save(root / folder / "1.npy", np.load(root / folder / "1.npy").astype(np.float64))
    image, targets = load("nyuv2", tmp_path).train[1]
    for tensor, folder in ((image, "image"), (targets["depth"], "depth"), (targets["normal"], "normal")):
        raw = np.load(root / folder / "1.npy")
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, torch.from_numpy(np.moveaxis(raw, -1, 0).astype(np.float32)))


def test_dense_losses_average_over_labelled_pixels():
    depth_target = torch.tensor([[[[0.0, 2.0, 1.0]]]])  # two pixels with depth
    assert depth_loss(torch.tensor([[[[9.0, 1.0, 4.0]]]]), depth_target).item() == pytest.approx((1 + 3) / 2)
    normals = torch.tensor([[[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]]])  # (1, 3, 1, 3): x, then y
    prediction = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 1.0, -2.0]], [[0.0, 0.0, 0.0]]]])
    expected = ((1 - 1 / 2**0.5) + (1 + 1.0)) / 2  # pixel 1 at 45 degrees, pixel 2 opposite, pixel 0 unlabelled
    assert normal_loss(prediction, normals).item() == pytest.approx(expected)


def test_segmentation_loss_is_cross_entropy_averaged_over_pixels_not_labelled_minus_one():
    logits = torch.tensor([[[[2.0, 0.0, -1.0]], [[0.0, 3.0, 1.0]], [[1.0, 1.0, 0.5]]]])  # (1, 3 classes, 1, 3)
    target = torch.tensor([[[0, -1, 2]]])
    by_hand = [torch.logsumexp(logits[0, :, 0, p], 0) - logits[0, c, 0, p] for p, c in ((0, 0), (2, 2))]
    assert segmentation_loss(logits, target).item() == pytest.approx(sum(by_hand).item() / 2)


@pytest.mark.parametrize("name, classes", [("nyuv2", 13), ("cityscapes", 7)])
def test_each_task_is_measured_as_in_mtan(tmp_path, name, classes):
    for split, n in (("train", 1), ("val", 1)):
        write_split(tmp_path, split, n, 2, 3, "label" if name == "nyuv2" else "label_7", classes,
                    normals=name == "nyuv2")
    tasks = load(name, tmp_path).tasks
    miou, abs_err = tasks["segmentation"].metric(), tasks["depth"].metric()
    assert (miou.name, miou.num_classes, miou.ignore_index) == ("miou", classes, -1)
    assert abs_err.name == "abs_err" and abs_err.ignore_zero  # 0 = no depth measurement
    assert (tasks["segmentation"].loss, tasks["depth"].loss) == (segmentation_loss, depth_loss)
    if name == "nyuv2":
        assert tasks["normal"].metric().name == "mean_angle" and tasks["normal"].loss is normal_loss


def test_a_malformed_first_validation_item_is_named_when_the_data_is_opened(tmp_path):
    nyuv2(tmp_path)
    np.save(tmp_path / "val" / "depth" / "0.npy", np.zeros((4, 6)))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'val' / 'depth' / '0.npy'))}: expected shape"):
        load("nyuv2", tmp_path)


@pytest.mark.parametrize("bad, says", [({(2, 3): 20.0}, "found 20.0 (1 pixels)"),
                                       ({(0, 1): 15.0, (3, 5): -2.0}, "found 15.0 (2 pixels)")])
def test_bad_class_ids_report_the_first_in_reading_order_and_their_count(tmp_path, bad, says):
    label = np.zeros((4, 6), dtype=np.float32)
    for pixel, value in bad.items():
        label[pixel] = value
    np.save(nyuv2(tmp_path) / "label" / "0.npy", label)
    with pytest.raises(DataError) as raised:
        load("nyuv2", tmp_path)
    assert str(raised.value).endswith(says)


def test_an_extra_file_in_a_task_folder_is_named(tmp_path):
    np.save(nyuv2(tmp_path) / "depth" / "3.npy", np.zeros((4, 6, 1)))
    with pytest.raises(DataError) as raised:
        load("nyuv2", tmp_path)
    assert str(raised.value) == (f"{tmp_path / 'train' / 'depth' / '3.npy'}: expected one file per image, "
                                 "3 in image/, found 4 in depth/")


def test_an_empty_image_folder_says_no_files_and_shows_the_layout(tmp_path):
    for folder in ("image", "label", "depth", "normal"):
        (tmp_path / "train" / folder).mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as raised:
        load("nyuv2", tmp_path)
    assert str(raised.value).startswith(f"no .npy files in {tmp_path / 'train' / 'image'}\nexpected layout:\n")


def test_the_training_command_trains_on_downsampled_images(tmp_path, monkeypatch):
    from reference_impls import train

    class Trained(Exception):
        pass

    def fit(model, bench, *args, **kwargs):
        raise Trained(bench.problem.input_shape, next(iter(bench.train))[0].shape)

    for split, count in (("train", 4), ("val", 2)):
        write_split(tmp_path, split, count, 8, 12, "label", 13, normals=True)
    monkeypatch.setattr(train, "fit", fit)
    with pytest.raises(Trained) as trained:
        train.main(["--arch", "pap", "--data", "nyuv2", "--root", str(tmp_path), "--data-kw", "downsample=4",
                    "--no-progress", "--device", "cpu"])
    assert trained.value.args == ((3, 2, 3), (3, 2, 3))


def test_a_dataset_opened_directly_keeps_the_files_size_and_names_an_item_of_another_size(tmp_path):
    """DenseNpy's own promises, without the benchmark's check_shapes: downsample defaults to 1
    (the files' size), and reading an item checks its image against image 0's size."""
    root = nyuv2(tmp_path)
    data = DenseNpy(tmp_path, "train", {"segmentation": "label", "depth": "depth", "normal": "normal"}, 13)
    image, targets = data[1]
    assert image.shape == (3, 4, 6) and targets["segmentation"].shape == (4, 6)
    np.save(root / "image" / "2.npy", np.zeros((5, 6, 3), np.float32))  # opening read image 0's header only
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'image' / '2.npy'))}: expected an image of 4 x 6"):
        data[2]


def test_a_missing_task_folder_is_named_with_the_expected_layout(tmp_path):
    root = nyuv2(tmp_path)
    for path in (root / "depth").iterdir():
        path.unlink()
    (root / "depth").rmdir()
    with pytest.raises(FileNotFoundError) as raised:
        load("nyuv2", tmp_path)
    assert str(raised.value).startswith(f"missing {root / 'depth'}\nexpected layout:\n")
    assert "(H, W, 1) float, 0 = missing" in str(raised.value)  # the layout itself, not a placeholder


def test_cityscapes_prefers_mtans_label_7_when_label_is_there_too(tmp_path):
    """The docstring's rule: label_7 by default, label/ only where label_7 does not exist."""
    for split, n in (("train", 2), ("val", 1)):
        write_split(tmp_path, split, n, 4, 8, "label_7", 7, normals=False)
        (tmp_path / split / "label").mkdir()
        for i in range(n):  # a different labelling in label/, all class 3
            np.save(tmp_path / split / "label" / f"{i}.npy", np.full((4, 8), 3.0, np.float32))
    label_7 = np.load(tmp_path / "train" / "label_7" / "1.npy")
    assert not (label_7 == 3).all()
    segmentation = load("cityscapes", tmp_path).train[1][1]["segmentation"]
    assert torch.equal(segmentation, torch.from_numpy(label_7.astype(np.int64)))
