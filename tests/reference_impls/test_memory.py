"""A model too big for the machine is refused before it is built, with its size."""

import os
import re
from pathlib import Path

import pytest
import torch

from reference_impls import memory, train
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})
IMG = Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)
TINY = ["--data", "synthetic", "--data-kw", "n_train=32", "n_test=16", "dim=12", "num_sines=2",
        "--epochs", "1", "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("name, problem", [("mmoe", VEC), ("afa", IMG), ("bmtn", VEC), ("trl", IMG)])
def test_the_meta_size_is_the_real_models_parameters_and_training_bytes(name, problem):
    """TRL keeps its masks as buffers: they count once, parameters four times (weights,
    gradients and Adam's two moments, float32)."""
    real = build(name, problem, seed=0) if name == "trl" else build(name, problem)
    params = sum(p.numel() for p in real.parameters())
    buffers = sum(b.numel() * b.element_size() for b in real.buffers())
    assert memory.meta_size(lambda: build(name, problem)) == memory.MetaSize(params, 12 * params + buffers, 4 * params,
                                                                             None)
    assert memory.meta_size(lambda: build(name, problem)).at_step == 16 * params + buffers
    assert name != "trl" or buffers > 0


def test_afa_for_forty_celeba_attributes_is_sized_without_allocating_its_27_billion_weights():
    tasks = tuple(f"attr{k}" for k in range(40))
    problem = Problem(tasks, (3, 64, 64), {t: 1 for t in tasks})
    size = memory.meta_size(lambda: build("afa", problem))
    assert size.params > 40 * 64 * 64 * 40 * 64 * 64  # SAM: an H*W -> K*H*W map per target task
    assert size.at_step > 16 * 40**2 * 4096**2


def test_a_forward_pass_on_meta_finds_the_largest_tensor_kept_for_backward():
    """PAP's affinity of every pixel to every other: (B, H*W, H*W)."""
    size = memory.meta_size(lambda: build("pap", IMG), (2, 3, 8, 8))
    assert size.saved.largest == (2 * 64 * 64 * 4, (2, 64, 64))
    real = build("pap", IMG)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        real(torch.randn(2, 3, 8, 8))
    assert (2, 64, 64) in kept and all(torch.Size(s).numel() <= 2 * 64 * 64 for s in kept)


@pytest.mark.parametrize("name, problem", [("pap", IMG), ("mtan", IMG), ("mmoe", VEC), ("nddr", IMG)])
def test_what_a_forward_pass_keeps_on_meta_is_what_the_real_pass_keeps(name, problem):
    """Each storage once, parameters and buffers left out: on the CPU told apart by data pointer."""
    batch = (3, *problem.input_shape)
    torch.manual_seed(0)
    real = build(name, problem).train()
    own = {t.untyped_storage().data_ptr() for t in [*real.parameters(), *real.buffers()]}
    kept = {}

    def pack(saved):
        if saved.untyped_storage().data_ptr() not in own:
            kept[saved.untyped_storage().data_ptr()] = saved.untyped_storage().nbytes()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        outputs = real(torch.randn(batch))
    assert memory.meta_size(lambda: build(name, problem), batch).saved.total == sum(kept.values()) > 0
    del outputs


def test_a_tensor_one_forward_pass_keeps_is_refused_when_it_and_the_model_do_not_fit(monkeypatch):
    make, batch = (lambda: build("pap", IMG)), (2, 3, 8, 8)
    size = memory.meta_size(make, batch)
    enough = size.persistent + size.saved.total
    monkeypatch.setattr(memory, "device_memory", lambda device: enough)
    memory.require_fits("--arch pap", make, torch.device("cpu"), batch)
    monkeypatch.setattr(memory, "device_memory", lambda device: enough - 1)
    with pytest.raises(train.ConfigurationError, match=rf"^--arch pap: .*a forward pass on a batch of 2 keeps "
                                                       rf"{size.saved.total:,} bytes .*largest tensor of shape "
                                                       r"\(2, 64, 64\), 32,768 bytes"):
        memory.require_fits("--arch pap", make, torch.device("cpu"), batch)
    memory.require_fits("--arch pap", make, torch.device("cpu"), (1, 3, 8, 8))  # half the batch fits
    memory.require_fits("--arch pap", make, torch.device("cpu"))  # no batch: the model alone is checked


def test_a_forward_pass_that_reads_values_is_not_sized():
    assert memory.meta_size(lambda: build("routing_network", VEC), (2, 12)).saved is None


def test_a_constructor_that_reads_values_or_refuses_gives_no_size():
    assert memory.meta_size(lambda: build("pathnet", VEC)) is None  # reads .item() while building
    assert memory.meta_size(lambda: build("afa", VEC)) is None  # refuses vectors: the real build says so


def test_a_model_over_the_devices_memory_is_refused_naming_the_flag_and_the_sizes(monkeypatch):
    make = lambda: build("mmoe", VEC)  # noqa: E731
    params, needed = memory.meta_size(make).params, memory.meta_size(make).at_step
    monkeypatch.setattr(memory, "device_memory", lambda device: needed)
    memory.require_fits("--arch mmoe", make, torch.device("cpu"))  # exactly enough
    monkeypatch.setattr(memory, "device_memory", lambda device: needed - 1)
    with pytest.raises(train.ConfigurationError, match=rf"^--arch mmoe: this model has {params:,} parameters"
                                                       r".*training it on cpu takes at least.* there is\. Use fewer "
                                                       r"tasks, smaller inputs \(--data-kw downsample=N or size=N\) "
                                                       r"or a smaller width$"):
        memory.require_fits("--arch mmoe", make, torch.device("cpu"))


def test_a_gpu_run_also_needs_the_weights_to_fit_in_the_machines_memory_where_it_is_built(monkeypatch):
    make = lambda: build("mmoe", VEC)  # noqa: E731
    params, needed = memory.meta_size(make).params, memory.meta_size(make).at_step
    sizes = {"cuda": 10 * needed, "cpu": 4 * params - 1}
    monkeypatch.setattr(memory, "device_memory", lambda device: sizes[device.type])
    with pytest.raises(train.ConfigurationError, match="building it in this machine's memory"):
        memory.require_fits("--arch mmoe", make, torch.device("cuda"))
    sizes["cpu"] = 4 * params  # float32 weights exactly fill it: a lower bound refuses nothing that fits
    memory.require_fits("--arch mmoe", make, torch.device("cuda"))


def test_a_cuda_devices_memory_is_read_from_that_card(monkeypatch):
    asked = []

    def properties(device):
        asked.append(device)
        return type("Properties", (), {"total_memory": 80 * 2**30})()

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert memory.device_memory(torch.device("cuda", 1)) == 80 * 2**30
    assert asked == [torch.device("cuda", 1)]


def test_the_command_line_refuses_before_building_or_training(monkeypatch):
    """The multi-task model, then a --stl-arch model too big where the multi-task one fits: both
    are refused before any training, so no run is lost to a late failure."""
    def no_training(*args, **kwargs):
        raise AssertionError("fit() was called")

    monkeypatch.setattr(train, "fit", no_training)
    multi = memory.meta_size(lambda: build("mmoe", Problem(("y1", "y2"), (12,), {"y1": 1, "y2": 1}), width=64))
    single = memory.meta_size(lambda: build("shared_bottom", Problem(("y1",), (12,), {"y1": 1})))
    multi, single = multi.at_step, single.at_step
    assert single < multi
    monkeypatch.setattr(memory, "device_memory", lambda device: multi - 1)
    with pytest.raises(train.ConfigurationError, match="^--arch mmoe: this model has"):
        train.main(["--arch", "mmoe", "--arch-kw", "width=64", *TINY])
    monkeypatch.setattr(memory, "device_memory", lambda device: multi)
    with pytest.raises(train.ConfigurationError, match="^--stl-arch shared_bottom: this model has"):
        train.main(["--arch", "mmoe", "--arch-kw", "width=64", "--stl-arch", "shared_bottom", "--stl-kw", "width=256",
                    *TINY])


@pytest.mark.parametrize("size, text", [(999, "999 bytes"), (2_500_000, "2.5 MB"), (429_600_000_000, "429.6 GB"),
                                        (999_999, "999,999 bytes"), (10**6, "1.0 MB"), (10**9, "1.0 GB"),
                                        (1_050_000, "1.1 MB"), (1_050_000_000, "1.1 GB")])  # to the nearest tenth
def test_sizes_are_written_in_the_unit_that_shows_them(size, text):
    assert memory.readable(size) == text


def test_the_cpus_memory_is_the_machines_or_its_control_groups_limit_where_lower(tmp_path, monkeypatch):
    physical = memory.device_memory(torch.device("cpu"))
    assert physical is None or physical > 2**20
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_FILES", (str(limit),))
    for text, expected in (("max\n", None), ("1048576\n", 1048576), (str(2**63 - 4096), None)):
        limit.write_text(text)
        assert memory.cgroup_limit() == expected
    limit.write_text("1048576")
    assert memory.device_memory(torch.device("cpu")) == 1048576
    monkeypatch.setattr(memory, "CGROUP_FILES", (str(tmp_path / "v2_absent"), str(limit)))  # a cgroup v1 machine
    assert memory.cgroup_limit() == 1048576
    assert memory.device_memory(torch.device("meta")) is None


def test_an_address_space_limit_lowers_the_cpus_memory_by_what_the_process_has_mapped_already():
    """Under ``ulimit -v`` the interpreter and torch's libraries (about 0.65 GB here) count too;
    with the limit alone, models 0.2 GB short of it passed the check and failed in the allocator."""
    import resource
    import subprocess
    import sys
    probe = ("import torch; from reference_impls import memory; "
             "print(memory.device_memory(torch.device('cpu')), memory.address_space_used())")
    limit = 6 * 2**30
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    available, used = map(int, run.stdout.split())
    assert used > 100 * 2**20  # torch alone maps more than this
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert abs(available - min(limit - used, physical)) <= 16 * 2**20  # the two reads are a moment apart
    assert available < limit - 100 * 2**20


def test_what_an_address_space_limit_leaves_is_the_limit_less_what_is_mapped(monkeypatch):
    """The same rule in this process, where the limits are made up (the test above sets a real one)."""
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert memory.address_space_limit() is None and memory.address_space_left() is None
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (6 * 2**30, resource.RLIM_INFINITY))
    assert memory.address_space_limit() == 6 * 2**30
    for used, left in [(2**30, 5 * 2**30), (7 * 2**30, 0), (None, 6 * 2**30)]:  # None: no /proc to read
        monkeypatch.setattr(memory, "address_space_used", lambda: used)
        assert memory.address_space_left() == left, used


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc reports the size")
def test_the_address_space_used_is_the_size_the_kernel_reports():
    size_kb = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    assert abs(memory.address_space_used() - size_kb * 1024) <= 16 * 2**20


def test_the_command_line_sizes_a_forward_pass_at_its_batch_size(tmp_path, monkeypatch):
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder, shape in (("image", (8, 8, 3)), ("label", (8, 8)), ("depth", (8, 8, 1)), ("normal", (8, 8, 3))):
            (tmp_path / split / folder).mkdir(parents=True)
            for i in range(2):
                array = rng.integers(0, 13, shape) if folder == "label" else rng.random(shape)
                np.save(tmp_path / split / folder / f"{i}.npy", array.astype(np.float32))
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: pytest.fail("fit() was called"))
    problem = Problem(("segmentation", "depth", "normal"), (3, 8, 8), {"segmentation": 13, "depth": 1, "normal": 3},
                      dense=True)
    size = memory.meta_size(lambda: build("pap", problem), (2, 3, 8, 8))
    assert size.saved.largest[1] == (2, 64, 64)
    monkeypatch.setattr(memory, "device_memory", lambda device: size.persistent + size.saved.total - 1)
    with pytest.raises(train.ConfigurationError, match=r"^--arch pap: .* on a batch of 2 keeps .*largest tensor"):
        train.main(["--arch", "pap", "--data", "nyuv2", "--root", str(tmp_path), "--batch-size", "2",
                    "--no-progress", "--device", "cpu"])


def test_a_device_of_unknown_memory_is_not_sized_at_all():
    built = []
    memory.require_fits("--arch mmoe", lambda: built.append(1) or build("mmoe", VEC), torch.device("meta"))
    assert built == []  # device_memory(meta) is None: nothing to compare with, so no meta build
    memory.require_fits("--arch mmoe", lambda: built.append(1) or build("mmoe", VEC), torch.device("cpu"))
    assert built == [1]
