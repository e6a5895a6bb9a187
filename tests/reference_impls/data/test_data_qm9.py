import numpy as np
import pytest
import torch

from reference_impls.data import DataError, load
from reference_impls.data.qm9 import seeded_split
from reference_impls.data.synthetic import mse_loss

NAMES = np.array(["mu", "alpha", "homo"])


def test_qm9_npz_with_split(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 4)).astype(np.float32)
    targets = rng.normal(loc=5.0, scale=3.0, size=(10, 3))
    split = np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 2])
    np.savez(tmp_path / "qm9.npz", features=features, targets=targets, target_names=NAMES, split=split)
    bench = load("qm9", tmp_path)
    assert bench.problem.tasks == ("mu", "alpha", "homo") and bench.problem.input_shape == (4,)
    assert len(bench.train) == 6 and len(bench.test) == 3
    x, y = bench.test[0]  # row 7
    torch.testing.assert_close(x, torch.from_numpy(features[7]))
    mean, std = targets[:6].mean(0), targets[:6].std(0, ddof=1)
    assert y["alpha"].item() == pytest.approx((targets[7, 1] - mean[1]) / std[1], rel=1e-5)
    train_alpha = torch.stack([bench.train[i][1]["alpha"] for i in range(6)])
    assert train_alpha.mean().item() == pytest.approx(0.0, abs=1e-5)


def test_qm9_seeded_split_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="qm9.npz"):
        load("qm9", tmp_path)
    np.savez(tmp_path / "qm9.npz", features=np.zeros((20, 2)), targets=np.ones((20, 3)))
    with pytest.raises(DataError, match="lacks array.s. target_names") as raised:
        load("qm9", tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'qm9.npz'}: ")
    np.savez(tmp_path / "qm9.npz", features=np.arange(40.0).reshape(20, 2),
             targets=np.arange(60.0).reshape(20, 3), target_names=NAMES)
    a, b = load("qm9", tmp_path, seed=1), load("qm9", tmp_path, seed=1)
    assert len(a.train) == 16 and len(a.test) == 2
    torch.testing.assert_close(a.test.x, b.test.x)


def arrays(**changes):
    """A valid archive's arrays (10 molecules, 4 features, 3 targets, 6/1/3 split), with changes."""
    rng = np.random.default_rng(1)
    data = {"features": rng.normal(size=(10, 4)), "targets": rng.normal(size=(10, 3)),
            "target_names": NAMES, "split": np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 2])}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}  # None: leave the array out


def raises_for(root, *words):
    """Opening the benchmark raises DataError starting with the archive's path, naming ``words``."""
    with pytest.raises(DataError) as raised:
        load("qm9", root)
    message = str(raised.value)
    assert message.startswith(f"{root / 'qm9.npz'}: "), message
    for word in words:
        assert word in message, message
    return message


def with_value(array, row, column, value):
    array = array.copy()
    array[row, column] = value
    return array


BASE = arrays()
BAD_ARCHIVES = {
    "features_1d": (dict(features=np.zeros(10)), ["features with 2 dimension", "(10,)"]),
    "targets_3d": (dict(targets=np.zeros((10, 3, 1))), ["targets with 2 dimension", "(10, 3, 1)"]),
    "names_2d": (dict(target_names=NAMES[None]), ["target_names with 1 dimension", "(1, 3)"]),
    "rows_disagree": (dict(targets=np.zeros((9, 3))),
                      ["features has 10 rows", "(10, 4)", "targets has 9", "(9, 3)"]),
    "names_disagree": (dict(target_names=NAMES[:2]), ["targets has 3 columns", "target_names has 2 names"]),
    "names_repeat": (dict(target_names=np.array(["mu", "mu", "homo"])), ["distinct", "mu repeats"]),
    "text_features": (dict(features=np.full((10, 4), "a")), ["features of real numbers", "<U1"]),
    "text_targets": (dict(targets=np.full((10, 3), "a")), ["targets of real numbers", "<U1"]),  # names the array
    "split_short": (dict(split=np.zeros(9, dtype=int)), ["split of shape (10,)", "got shape (9,)"]),
    "split_2d": (dict(split=np.zeros((10, 1), dtype=int)), ["split of shape (10,)", "got shape (10, 1)"]),
    "split_value": (dict(split=np.array([0, 0, 0, 0, 3, 0, 1, 2, -1, 2])),
                    ["0 (train), 1 (val) or 2 (test)", "got 3 in row 4", "2 rows wrong"]),
    "nan_features": (dict(features=with_value(with_value(BASE["features"], 7, 0, np.nan), 3, 2, np.nan)),
                     ["features holds 2 non-finite values", "first in row 3"]),
    "nan_pair_in_one_row": (dict(features=with_value(with_value(BASE["features"], 4, 0, np.nan), 4, 3, -np.inf)),
                            ["features holds 2 non-finite values", "first in row 4"]),
    "inf_targets": (dict(targets=with_value(BASE["targets"], 5, 1, np.inf)),
                    ["targets holds 1 non-finite value", "first in row 5"]),
    "one_training_row": (dict(split=np.array([0, 1, 1, 1, 1, 1, 1, 2, 2, 2])),
                         ["1 of 10 molecules are in the training split", "at least 2"]),
    "seeded_split_too_small": (dict(features=np.zeros((2, 4)), targets=np.zeros((2, 3)), split=None),
                               ["1 of 2 molecules are in the training split"]),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_qm9_archive_that_breaks_the_layout_is_a_data_error(tmp_path, case):
    changes, words = BAD_ARCHIVES[case]
    np.savez(tmp_path / "qm9.npz", **arrays(**changes))
    raises_for(tmp_path, *words)


def test_qm9_bool_and_integer_features_still_load(tmp_path):
    features = np.arange(40).reshape(10, 4) % 2 == 0
    np.savez(tmp_path / "qm9.npz", **arrays(features=features, targets=np.arange(30).reshape(10, 3)))
    assert len(load("qm9", tmp_path).train) == 6


def test_qm9_file_that_is_not_an_npz_archive(tmp_path):
    path = tmp_path / "qm9.npz"
    path.write_text("mu alpha homo\n1 2 3\n")
    message = raises_for(tmp_path, "not a readable .npz archive", "not a zip file")
    assert "pickle" not in message  # numpy's own text suggested loading it unsafely with allow_pickle=True
    np.savez(path, **arrays())
    path.write_bytes(path.read_bytes()[:200])  # truncated download
    raises_for(tmp_path, "not a readable .npz archive", "BadZipFile")
    path.write_bytes(b"")
    raises_for(tmp_path, "not a readable .npz archive")
    with path.open("wb") as file:  # np.save writes a bare .npy whatever the name
        np.save(file, np.zeros((10, 4)))
    raises_for(tmp_path, "expected an .npz archive of named arrays", "single .npy")
    np.savez(path, **arrays(target_names=np.array(["mu", 1, None], dtype=object)))
    raises_for(tmp_path, "an array could not be read", "allow_pickle")


def test_qm9_without_split_uses_an_80_10_10_shuffle_chosen_by_the_seed(tmp_path):
    first = seeded_split(20, 0)
    assert np.bincount(first).tolist() == [16, 2, 2] and np.array_equal(seeded_split(20, 0), first)
    assert not np.array_equal(first, np.sort(first))  # shuffled, not the first 16 rows
    assert not np.array_equal(seeded_split(20, 1), first)
    features = np.arange(40.0).reshape(20, 2)
    np.savez(tmp_path / "qm9.npz", features=features, targets=np.arange(60.0).reshape(20, 3), target_names=NAMES)
    torch.testing.assert_close(load("qm9", tmp_path).test.x, torch.from_numpy(features[first == 2]).float())
    other = seeded_split(20, 1)  # the run's seed picks the split
    torch.testing.assert_close(load("qm9", tmp_path, seed=1).test.x, torch.from_numpy(features[other == 2]).float())


def test_qm9_standardisation_is_stored_and_a_constant_target_becomes_zero(tmp_path):
    data = arrays(targets=with_value(arrays()["targets"], slice(None), 2, 4.0))  # homo is 4.0 everywhere
    np.savez(tmp_path / "qm9.npz", **data)
    bench = load("qm9", tmp_path)
    train = data["targets"][:6]
    torch.testing.assert_close(bench.extras["target_mean"], torch.from_numpy(train.mean(0)).float())
    torch.testing.assert_close(bench.extras["target_std"][:2], torch.from_numpy(train.std(0, ddof=1)[:2]).float())
    assert torch.equal(bench.test.labels["homo"], torch.zeros(3))  # not 0/0 = NaN
    spec = bench.tasks["mu"]
    assert spec.loss is mse_loss and spec.metric().name == "abs_err"


def test_test_split_chooses_val_or_test_rows_and_nothing_else(tmp_path):
    """test_split=3 used to give an empty test set scored as 0; 0 would test on training rows."""
    features = np.arange(20.0).reshape(10, 2)
    split = np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 2])
    np.savez(tmp_path / "qm9.npz", features=features, targets=np.arange(30.0).reshape(10, 3),
             target_names=NAMES, split=split)
    val = load("qm9", tmp_path, test_split=1)
    assert len(val.test) == 1 and torch.equal(val.test[0][0], torch.tensor([12.0, 13.0]))
    for wrong in (0, 3):
        with pytest.raises(ValueError, match=f"test_split must be 1 .val. or 2 .test., got {wrong}"):
            load("qm9", tmp_path, test_split=wrong)


def test_a_missing_archive_is_reported_with_the_layout_it_should_follow(tmp_path):
    """The package promises that a missing file's error spells the expected layout out."""
    with pytest.raises(FileNotFoundError) as raised:
        load("qm9", tmp_path)
    message = str(raised.value)
    assert message.startswith(f"missing {tmp_path / 'qm9.npz'}\nexpected layout:\n"), message
    assert all(array in message for array in ("features", "targets", "target_names", "split")), message


def test_an_unknown_data_name_is_a_key_error_that_lists_the_known_ones():
    with pytest.raises(KeyError) as raised:
        load("qm10", "anywhere")
    assert all(name in str(raised.value) for name in ("synthetic", "celeba", "qm9", "office31", "office_home"))


def test_data_options_reach_the_synthetic_generator_and_otherwise_the_loader_alone():
    """--data-kw options go to the loader; only the synthetic loader forwards extra ones to its generator."""
    from reference_impls.data import option_functions, qm9, synthetic

    assert option_functions("synthetic") == [synthetic.benchmark, synthetic.correlated_regression]
    assert option_functions("qm9") == [qm9.benchmark]
