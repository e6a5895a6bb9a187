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


# ----------------------------------------------------------------------------------------------
# The domains as one benchmark for the training loop
# ----------------------------------------------------------------------------------------------

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from reference_impls import train  # noqa: E402
from reference_impls.architectures.registry import Problem, build  # noqa: E402
from reference_impls.data import office  # noqa: E402
from reference_impls.metrics import Accuracy  # noqa: E402

COLOURS = {"bike": (200, 30, 30), "calculator": (30, 30, 200), "mug": (30, 200, 30)}


def write_office31(root, per_class):
    """Each class one colour plus noise, so a small network can tell the classes apart."""
    rng = np.random.default_rng(0)
    for domain, count in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / domain / "images" / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (6, 6, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"frame_{i}.jpg")


@pytest.fixture(scope="module")
def office31(tmp_path_factory):
    root = tmp_path_factory.mktemp("office31")
    write_office31(root, {"amazon": 8, "dslr": 3, "webcam": 5})
    return root


def test_each_image_is_labelled_for_its_own_domain_only(office31):
    bench = office.office31_benchmark(office31, size=4, test_fraction=1 / 3)
    assert bench.problem.tasks == ("amazon", "dslr", "webcam") and bench.problem.input_shape == (3, 4, 4)
    assert bench.problem.out_dims == {"amazon": 3, "dslr": 3, "webcam": 3}
    assert len(bench.train) == 16 + 6 + 10 and len(bench.test) == 8 + 3 + 5  # 2/3 and 1/3 of 24, 9, 15
    seen = {d: 0 for d in bench.problem.tasks}
    for i in range(len(bench.train)):
        _, targets = bench.train[i]
        own = [d for d, label in targets.items() if label != office.NOT_THIS_DOMAIN]
        assert len(own) == 1 and i in bench.train.indices(own[0])
        seen[own[0]] += 1
    assert seen == {"amazon": 16, "dslr": 6, "webcam": 10}
    with pytest.raises(IndexError):
        bench.train[len(bench.train)]


def test_every_batch_holds_batch_size_images_of_each_domain_and_an_epoch_covers_the_largest():
    domains = [range(0, 8), range(8, 11), range(11, 16)]
    sampler = office.DomainBatches(domains, batch_size=4, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and sampler.batch_examples == 4 + 3 + 4
    for batch in batches:
        assert [sum(i in d for i in batch) for d in domains] == [4, 3, 4]
    assert sorted(i for b in batches for i in b if i in domains[0]) == list(domains[0])  # each once
    assert sorted(i for i in batches[0] if i in domains[1]) == list(domains[1])  # a small domain whole
    again = list(office.DomainBatches(domains, 4, torch.Generator().manual_seed(0)))
    other = list(office.DomainBatches(domains, 4, torch.Generator().manual_seed(1)))
    assert again == batches and other != batches


def test_a_smaller_domain_is_drawn_whole_before_any_image_repeats():
    sampler = office.DomainBatches([range(0, 12), range(12, 17)], batch_size=3, generator=torch.Generator().manual_seed(0))
    small = [i for b in sampler for i in b if i >= 12]  # 4 batches x 3 = 12 draws from 5 images
    assert sorted(small[:5]) == sorted(small[5:10]) == list(range(12, 17))


def test_a_domains_loss_and_accuracy_see_its_own_images_only():
    torch.manual_seed(0)
    prediction = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([2, -1, 0, -1, -1, 1])
    mine = target != office.NOT_THIS_DOMAIN
    loss = office.domain_loss(prediction, target)
    torch.testing.assert_close(loss, F.cross_entropy(prediction[mine], target[mine]))
    loss.backward()
    assert prediction.grad[~mine].abs().sum() == 0 and prediction.grad[mine].abs().sum() > 0
    none = office.domain_loss(prediction, torch.full((6,), -1))
    assert none.item() == 0 and none.requires_grad
    accuracy = Accuracy(ignore_index=office.NOT_THIS_DOMAIN)
    accuracy.update(torch.eye(3)[[2, 0, 0, 1, 1, 0]], target)  # right on 2 and 0, wrong on 1 -> 2 of 3
    assert accuracy.compute() == pytest.approx(2 / 3) and accuracy.count == 3


def test_the_concatenated_batch_gives_each_task_the_loss_and_gradient_of_its_own_domain(office31):
    """What the multi-input loop computes: task k's loss on domain k's batch alone. Without
    batch norm in training mode, the mixed batch gives exactly that, value and gradient."""
    bench = office.office31_benchmark(office31, size=4, test_fraction=1 / 3)
    model = build("shared_bottom", bench.problem).eval()  # eval: batch norm uses running statistics
    batch = next(iter(train.training_batches(model, bench.train, 4, seed=0, label="test")))
    x, targets = batch
    for task in bench.problem.tasks:
        own = targets[task] != office.NOT_THIS_DOMAIN
        mixed = office.domain_loss(model(x)[task], targets[task])
        mixed_grads = torch.autograd.grad(mixed, list(model.parameters()), allow_unused=True)
        alone = F.cross_entropy(model(x[own])[task], targets[task][own])
        alone_grads = torch.autograd.grad(alone, list(model.parameters()), allow_unused=True)
        torch.testing.assert_close(mixed, alone)
        for a, b in zip(mixed_grads, alone_grads):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_a_single_task_model_is_trained_on_its_own_domain_only(office31):
    bench = office.office31_benchmark(office31, size=4, test_fraction=1 / 3)
    single = build("shared_bottom", Problem(("dslr",), bench.problem.input_shape, {"dslr": 3}))
    loader = train.training_batches(single, bench.train, 4, seed=0, label="test")
    indices = [i for b in loader.batch_sampler for i in b]
    assert set(indices) == set(bench.train.indices("dslr"))


def test_too_few_images_to_split_is_refused_naming_the_domain(tmp_path):
    write_office31(tmp_path, {"amazon": 2, "dslr": 2, "webcam": 2})
    for bad in (0, 1):
        with pytest.raises(ValueError, match=r"test_fraction must lie in \(0, 1\)"):
            office.office31_benchmark(tmp_path, test_fraction=bad)
    (tmp_path / "webcam" / "images" / "bike" / "frame_1.jpg").unlink()
    for name in ("calculator", "mug"):
        for i in range(2):
            (tmp_path / "webcam" / "images" / name / f"frame_{i}.jpg").unlink()
    with pytest.raises(ValueError, match="domain webcam has 1 image"):
        office.office31_benchmark(tmp_path, test_fraction=0.2)


def test_the_harness_trains_on_office_and_beats_chance_on_every_domain(office31, capsys):
    result = train.main(["--data", "office31", "--root", str(office31), "--data-kw", "size=6", "test_fraction=0.34",
                         "--arch", "mmoe", "--method", "pcgrad", "--epochs", "6", "--batch-size", "4",
                         "--lr", "1e-2", "--no-progress"])
    assert set(result["multi_task"]) == {"amazon/accuracy", "dslr/accuracy", "webcam/accuracy"}
    assert all(value > 1 / 3 for value in result["multi_task"].values())  # three classes
    assert "| dslr/accuracy | no |" in capsys.readouterr().out


def test_methods_that_hold_data_out_hold_out_part_of_every_domain(office31):
    from reference_impls import hooks

    bench = office.office31_benchmark(office31, size=4, test_fraction=1 / 3)  # train: 16, 6, 10 images
    rest, val = hooks.validation_split(bench.train, 0.1, seed=0)
    assert [len(val.indices(d)) for d in bench.problem.tasks] == [2, 1, 1]  # round(1.6), at least 1, round(1.0)
    assert [len(rest.indices(d)) for d in bench.problem.tasks] == [14, 5, 9]
    images = lambda data: {tuple(data[i][0].flatten().tolist()) for i in range(len(data))}  # noqa: E731
    assert not images(rest) & images(val) and len(images(rest) | images(val)) == len(bench.train)
    rest2, val2 = hooks.validation_split(bench.train, 0.1, seed=0)
    assert images(val2) == images(val)
    rest, val = hooks.validation_split(bench.train, 0.99, seed=0)  # most of each domain, never all of it
    assert [len(rest.indices(d)) for d in bench.problem.tasks] == [1, 1, 1]
    _, batches = hooks.held_out_batches(bench.train, "aw", batch_size=4, seed=0)
    _, targets = next(batches)
    assert all((targets[d] != office.NOT_THIS_DOMAIN).any() for d in bench.problem.tasks)


def test_a_method_that_holds_data_out_trains_on_office(office31):
    result = train.main(["--data", "office31", "--root", str(office31), "--data-kw", "size=4", "test_fraction=0.34",
                         "--method", "aw", "--epochs", "1", "--batch-size", "4", "--no-progress"])
    assert set(result["multi_task"]) == {"amazon/accuracy", "dslr/accuracy", "webcam/accuracy"}


def test_office_home_reads_the_archives_real_world_folder_with_a_space(tmp_path):
    """The official archive (OfficeHomeDataset_10072016) has 'Real World'; many copies 'Real_World'."""
    for domain in ("Art", "Clipart", "Product", "Real World"):
        write_images(tmp_path / domain / "Mug", 1)
    sets, classes = domains(tmp_path, names=office.OFFICE_HOME, size=4)
    assert list(sets) == ["Art", "Clipart", "Product", "Real_World"] and len(sets["Real_World"]) == 1
    write_images(tmp_path / "Real_World" / "Mug", 2)  # both present: the task's own name wins
    assert len(domains(tmp_path, names=office.OFFICE_HOME, size=4)[0]["Real_World"]) == 2
    (tmp_path / "Other").mkdir()
    with pytest.raises(FileNotFoundError, match="Real World or Real_World"):
        domains(tmp_path / "Other", names=office.OFFICE_HOME)


def test_a_size_below_one_pixel_is_the_option_s_error_not_the_first_image_s(tmp_path):
    write_office31(tmp_path, {"amazon": 2, "dslr": 2, "webcam": 2})
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"size must be at least 1 .pixels per side., got {bad}"):
            office.office31_benchmark(tmp_path, size=bad)


def test_the_benchmark_splits_each_domain_as_split_does_with_the_seed_given(office31):
    """``seed`` reaches the split through load and office31_benchmark (docstring: "split ... by
    ``seed``"); 1 pixel per side is allowed; extras name the classes in their shared sorted order."""
    from reference_impls.data import load

    parts, classes = domains(office31, office.OFFICE_31, size=1)
    bench = load("office31", office31, size=1, test_fraction=1 / 3, seed=3)
    for d in office.OFFICE_31:
        train_part, test_part = split(parts[d], 1 / 3, seed=3)
        assert bench.train.parts[d].indices == train_part.indices and bench.test.parts[d].indices == test_part.indices
    assert any(split(parts[d], 1 / 3, seed=0)[1].indices != bench.test.parts[d].indices for d in office.OFFICE_31)
    assert bench.train[0][0].shape == (3, 1, 1)
    assert bench.extras["classes"] == classes == sorted(COLOURS)
    defaults = office.benchmark(office31)  # the defaults are a usable configuration
    assert all(len(defaults.train.indices(d)) and len(defaults.test.indices(d)) for d in office.OFFICE_31)


def test_office_home_is_loaded_by_its_name(tmp_path):
    from reference_impls.data import load

    for domain in office.OFFICE_HOME:
        write_images(tmp_path / domain / "Mug", 2)
    bench = load("office_home", tmp_path, size=2, test_fraction=0.5)
    assert bench.problem.tasks == office.OFFICE_HOME and bench.extras["classes"] == ["Mug"]


def test_the_batches_are_drawn_with_the_generator_given_not_the_global_one():
    """Reproducible batches need the harness's seeded generator, whatever the global RNG did since."""
    data = office.DomainTargets({"a": list(range(6)), "b": list(range(4))})
    drawn = []
    for global_seed in (1, 2):
        sampler = data.batch_sampler(None, 2, torch.Generator().manual_seed(0))
        torch.manual_seed(global_seed)
        drawn.append(list(sampler))
    assert drawn[0] == drawn[1]
    assert list(data.batch_sampler(None, 2, torch.Generator().manual_seed(5))) != drawn[0]


def test_office_home_splits_with_the_seed_given(tmp_path):
    """``seed`` reaches Office-Home's split as it does Office-31's."""
    for domain in office.OFFICE_HOME:
        write_images(tmp_path / domain / "Mug", 6)
    got = office.office_home_benchmark(tmp_path, size=2, test_fraction=0.5, seed=3)
    want = office.benchmark(tmp_path, office.OFFICE_HOME, size=2, test_fraction=0.5, seed=3)
    other = office.benchmark(tmp_path, office.OFFICE_HOME, size=2, test_fraction=0.5, seed=0)
    assert all(got.test.parts[d].indices == want.test.parts[d].indices for d in office.OFFICE_HOME)
    assert any(other.test.parts[d].indices != want.test.parts[d].indices for d in office.OFFICE_HOME)  # seed matters


def test_a_batch_norm_baseline_on_one_domains_batches_of_one_is_refused_before_training(office31, monkeypatch):
    """The multi-task batches hold one image of each domain (three), a single-task model's only one
    of its own: the up-front check must draw each baseline's own batches, not the multi-task ones."""
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: pytest.fail("fit() was called"))
    with pytest.raises(train.ConfigurationError, match=r"^single-task amazon: batch norm needs at least 2"):
        train.main(["--data", "office31", "--root", str(office31), "--data-kw", "size=6", "test_fraction=0.34",
                    "--arch", "mmoe", "--stl-arch", "nddr", "--batch-size", "1", "--no-progress"])
