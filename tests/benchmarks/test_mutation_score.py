"""benchmarks/mutation_score.py: the mutmut table it writes, the results it reads, the score it prints."""

import re
import subprocess
import sys

import pytest

from .conftest import BENCHMARKS, load_script

REPO = BENCHMARKS.parent

# what `mutmut results --all true` prints, warnings on other lines included
RESULTS = """\
/venv/lib/python3.11/site-packages/mutmut/configuration.py:143: UserWarning: a deprecation
    reference_impls.weighting.aw.xǁAWǁobserve_validation_losses__mutmut_9: survived
    reference_impls.weighting.aw.xǁAWǁobserve_validation_losses__mutmut_10: killed
    reference_impls.weighting.aw.xǁAWǁ__init____mutmut_1: killed
    reference_impls.weighting.ew.x_equal_weights__mutmut_2: no tests
    reference_impls.weighting.ew.x_equal_weights__mutmut_3: killed
    reference_impls.weighting.ew.x_equal_weights__mutmut_4: survived
"""


def test_the_mutmut_table_mutates_one_package_and_selects_its_tests():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    script = load_script("mutation_score")
    weighting = script.Target("weighting")
    section = script.mutmut_section(weighting, ["aw", "ew"], script.default_tests(weighting, REPO),
                                    ["README.md", "reference_impls/", "tests/"])
    config = tomllib.loads(section)["tool"]["mutmut"]
    assert config["source_paths"] == ["reference_impls/weighting/"]
    assert config["pytest_add_cli_args_test_selection"] == ["tests/reference_impls/weighting/"]
    assert config["only_mutate"] == ["reference_impls/weighting/aw.py", "reference_impls/weighting/ew.py"]
    assert "reference_impls/" in config["also_copy"]  # the package imports its siblings
    merging = script.mutmut_section(script.Target("merging"), [], ["tests/reference_impls/merging/"], ["tests/"])
    assert "only_mutate" not in tomllib.loads(merging)["tool"]["mutmut"]


def test_a_top_level_module_is_one_source_file_tested_by_its_test_file():
    tomllib = pytest.importorskip("tomllib")
    script = load_script("mutation_score")
    metrics = script.find_target("metrics", REPO)
    assert metrics == script.Target("metrics", is_module=True)
    assert script.default_tests(metrics, REPO) == ["tests/reference_impls/test_metrics.py"]
    tests = ["tests/reference_impls/test_metrics.py", "tests/reference_impls/test_train.py"]
    config = tomllib.loads(script.mutmut_section(metrics, [], tests, ["tests/"]))["tool"]["mutmut"]
    assert config["source_paths"] == ["reference_impls/metrics.py"]
    assert config["pytest_add_cli_args_test_selection"] == tests
    assert script.module_of("reference_impls.metrics.x_delta_m__mutmut_3", metrics) == "metrics"
    assert script.module_of("reference_impls.metrics.xǁRunningMeanǁadd__mutmut_1", metrics) == "metrics"


def test_a_package_without_a_test_folder_is_tested_by_its_test_file():
    script = load_script("mutation_score")
    toy = script.find_target("toy", REPO)
    assert toy == script.Target("toy")  # a folder: one row per module
    assert script.default_tests(toy, REPO) == ["tests/reference_impls/test_toy.py"]
    assert script.module_of("reference_impls.toy.lockstep.x_run__mutmut_1", toy) == "lockstep"


def test_a_package_at_the_repository_root_is_a_target_tested_by_its_own_test_folder():
    tomllib = pytest.importorskip("tomllib")
    script = load_script("mutation_score")
    site_gen = script.find_target("site_gen", REPO)
    assert site_gen == script.Target("site_gen", parent="") and site_gen.source == "site_gen/"
    assert script.default_tests(site_gen, REPO) == ["tests/site_gen/"]
    config = tomllib.loads(script.mutmut_section(site_gen, ["models"], ["tests/site_gen/"], ["tests/"]))
    assert config["tool"]["mutmut"]["only_mutate"] == ["site_gen/models.py"]
    assert script.module_of("site_gen.models.xǁPaperǁcheck__mutmut_2", site_gen) == "models"
    # a subpackage's modules are rows of their own, named as --only takes them
    assert script.module_of("site_gen.site.pages.x__env__mutmut_1", site_gen) == "site/pages"
    assert script.module_of("site_gen.site.links.xǁLinkǁresolve__mutmut_4", site_gen) == "site/links"
    assert script.module_of("site_gen.site.x_helper__mutmut_1", site_gen) == "site/__init__"
    assert script.read_statuses("    site_gen.models.x_load__mutmut_1: killed\n") == {
        "site_gen.models.x_load__mutmut_1": "killed"}


def test_the_benchmark_scripts_are_a_target_whose_mutants_are_named_as_their_tests_load_them():
    tomllib = pytest.importorskip("tomllib")
    script = load_script("mutation_score")
    scripts = script.find_target("benchmarks", REPO)
    assert scripts == script.Target("benchmarks", parent="") and scripts.source == "benchmarks/"
    assert script.default_tests(scripts, REPO) == ["tests/benchmarks/"]
    config = tomllib.loads(script.mutmut_section(scripts, ["mmoe_correlation"], ["tests/benchmarks/"], ["tests/"]))
    assert config["tool"]["mutmut"]["only_mutate"] == ["benchmarks/mmoe_correlation.py"]
    assert script.module_of("benchmarks.mmoe_correlation.x_sign_test__mutmut_1", scripts) == "mmoe_correlation"
    # mutmut activates a mutant only in the module of that name: the tests' loader must give it
    assert script.__name__ == "benchmarks.mutation_score"


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="scratch_copy lists a git checkout's files; "
                    "mutmut's own copy of the tree, where a mutation run of the scripts runs this, is none")
def test_the_scratch_copy_names_every_top_level_file_and_folder_the_tests_may_read(tmp_path):
    copied = load_script("mutation_score").scratch_copy(tmp_path)
    assert {"README.md", "mkdocs.yml", "catalog/", "docs/", "reference_impls/", "site_gen/", "tests/"} <= set(copied)
    assert all((tmp_path / name).exists() for name in copied)


def test_a_target_without_tests_asks_for_them(tmp_path):
    (tmp_path / "reference_impls").mkdir()
    (tmp_path / "reference_impls" / "lonely.py").write_text("")
    script = load_script("mutation_score")
    with pytest.raises(ValueError, match="test_lonely.py: name the tests with --tests"):
        script.default_tests(script.find_target("lonely", tmp_path), tmp_path)


def test_results_are_read_per_mutant_with_multi_word_statuses():
    statuses = load_script("mutation_score").read_statuses(RESULTS)
    assert len(statuses) == 6
    assert statuses["reference_impls.weighting.ew.x_equal_weights__mutmut_2"] == "no tests"
    assert statuses["reference_impls.weighting.aw.xǁAWǁobserve_validation_losses__mutmut_9"] == "survived"


def test_the_score_is_killed_over_mutants_per_module_and_overall():
    script = load_script("mutation_score")
    rows = script.summarise(script.read_statuses(RESULTS), script.Target("weighting"))
    by_module = {r.module: r for r in rows}
    assert [r.module for r in rows] == ["ew", "aw", "all"]  # lowest score first, the total last
    assert (by_module["aw"].mutants, by_module["aw"].killed, by_module["aw"].survived) == (3, 2, 1)
    assert (by_module["ew"].killed, by_module["ew"].survived, by_module["ew"].other) == (1, 1, 1)
    assert by_module["all"].score == pytest.approx(3 / 6)
    assert by_module["all"].mutants == sum(r.mutants for r in rows[:-1])
    printed = script.table(rows).splitlines()
    assert printed[-1].split() == ["all", "6", "3", "2", "1", "50.0%"]


def test_a_function_of_the_packages_init_counts_under_init():
    script = load_script("mutation_score")
    data = script.Target("data")
    assert script.module_of("reference_impls.data.x_load__mutmut_10", data) == "__init__"
    assert script.module_of("reference_impls.data.celeba.xǁCelebAǁ__init____mutmut_1", data) == "celeba"


def test_a_mutant_of_another_package_is_refused_by_name():
    script = load_script("mutation_score")
    with pytest.raises(ValueError, match="merging.*package 'weighting'"):
        script.module_of("reference_impls.merging.ties.x_trim__mutmut_1", script.Target("weighting"))
    with pytest.raises(ValueError, match="trainer.*module 'train'"):
        script.module_of("reference_impls.trainer.x_fit__mutmut_1", script.Target("train", is_module=True))


@pytest.mark.parametrize("argv, message", [
    (["no_such_package"], "no package reference_impls/no_such_package/, no module .*no_such_package.py, "
                           "no package no_such_package/ and no folder no_such_package/ with tests in "
                           "tests/no_such_package/"),
    (["docs"], "no package .*docs/ and no folder docs/ with tests in tests/docs/"),
    (["weighting", "--only", "nope"], "no module .*weighting/nope.py"),
    (["train", "--only", "main"], "--only picks modules of a package; reference_impls/train.py is one module"),
    (["metrics", "--tests", "tests/reference_impls/test_nope.py"], "--tests: no tests/reference_impls/test_nope.py")])
def test_unknown_packages_and_modules_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("mutation_score").main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


SURVIVORS = """\
# reference_impls.weighting.aw.xǁAWǁ__init____mutmut_1: survived
--- reference_impls/weighting/aw.py
+++ reference_impls/weighting/aw.py
-    x = 1
+    x = 2

# reference_impls.weighting.ew.x_equal_weights__mutmut_4: survived
--- reference_impls/weighting/ew.py
+++ reference_impls/weighting/ew.py
-    return w
+    return None

"""


def test_a_survivors_file_is_read_back_as_names_and_diffs():
    script = load_script("mutation_score")
    blocks = script.survivor_blocks(SURVIVORS, script.Target("weighting"))
    assert list(blocks) == ["reference_impls.weighting.aw.xǁAWǁ__init____mutmut_1",
                            "reference_impls.weighting.ew.x_equal_weights__mutmut_4"]
    assert blocks["reference_impls.weighting.ew.x_equal_weights__mutmut_4"].splitlines()[-1] == "+    return None"
    assert "x = 2" not in blocks["reference_impls.weighting.ew.x_equal_weights__mutmut_4"]  # one diff per name


def test_a_rerun_flags_a_mutant_whose_diff_is_another_edit_now():
    script = load_script("mutation_score")
    recorded = script.survivor_blocks(SURVIVORS, script.Target("weighting"))
    now = dict(recorded)
    assert script.changed_since(recorded, now) == []
    aw = "reference_impls.weighting.aw.xǁAWǁ__init____mutmut_1"
    now[aw] = now[aw].replace("x = 2", "x = 0")
    assert script.changed_since(recorded, now) == [aw]
    del now[aw]
    assert script.changed_since(recorded, now) == [aw]  # gone altogether


@pytest.mark.parametrize("text, message", [("not a survivors file", "not a file written by --survivors"),
                                           (SURVIVORS.replace("weighting.ew", "merging.ew"), "merging.*weighting")])
def test_a_rerun_file_that_is_not_this_packages_survivors_is_refused(tmp_path, text, message, capsys):
    path = tmp_path / "survivors.txt"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        load_script("mutation_score").main(["weighting", "--rerun", str(path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_rerun_takes_its_modules_from_the_file_not_from_only(tmp_path, capsys):
    path = tmp_path / "survivors.txt"
    path.write_text(SURVIVORS)
    with pytest.raises(SystemExit):
        load_script("mutation_score").main(["weighting", "--only", "aw", "--rerun", str(path)])
    assert "leave out --only" in capsys.readouterr().err


def test_only_a_root_package_or_a_folder_with_tests_is_a_root_target_and_reference_impls_is_not(tmp_path):
    """A folder at the root is a target when it is a package (``__init__.py``) even without a test
    folder; ``reference_impls`` itself, a package with tests, is refused: name one of its packages."""
    script = load_script("mutation_score")
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "__init__.py").write_text("")
    assert script.find_target("tool", tmp_path) == script.Target("tool", parent="")
    (tmp_path / "reference_impls").mkdir()
    (tmp_path / "reference_impls" / "__init__.py").write_text("")
    (tmp_path / "tests" / "reference_impls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no package reference_impls/reference_impls/"):
        script.find_target("reference_impls", tmp_path)


def test_a_top_level_module_is_tested_by_its_test_file_even_beside_a_test_folder_of_its_name(tmp_path):
    """A module's tests are ``test_<name>.py``; a folder ``tests/reference_impls/<name>/`` is a package's."""
    (tmp_path / "reference_impls").mkdir()
    (tmp_path / "reference_impls" / "solo.py").write_text("")
    (tmp_path / "tests" / "reference_impls" / "solo").mkdir(parents=True)
    (tmp_path / "tests" / "reference_impls" / "test_solo.py").write_text("")
    script = load_script("mutation_score")
    assert script.default_tests(script.find_target("solo", tmp_path), tmp_path) == [
        "tests/reference_impls/test_solo.py"]


def test_a_survivors_file_with_one_survivor_is_read_back():
    """One survivor is a valid ``--survivors`` file (the rerun of a nearly finished package)."""
    script = load_script("mutation_score")
    one = SURVIVORS.split("\n\n")[0] + "\n"
    assert list(script.survivor_blocks(one, script.Target("weighting"))) == [
        "reference_impls.weighting.aw.xǁAWǁ__init____mutmut_1"]


def test_the_printed_table_has_its_header_then_one_line_per_row():
    script = load_script("mutation_score")
    rows = script.summarise(script.read_statuses(RESULTS), script.Target("weighting"))
    printed = script.table(rows).splitlines()
    assert printed[0].split() == ["module", "mutants", "killed", "survived", "other", "score"]
    assert [line.split()[0] for line in printed[1:]] == ["ew", "aw", "all"]


class FakeMutmut:
    """Stands in for the scratch copy, the mutmut command and its diffs, so that ``main`` runs in
    milliseconds: records each mutmut call with the mutmut table it found in the scratch folder."""

    def __init__(self, script, monkeypatch, results=RESULTS, diffs=None):
        self.results, self.diffs = results, diffs or {}
        self.calls, self.configs, self.diff_requests, self.scratch = [], [], [], None
        monkeypatch.setattr(script, "scratch_copy", self.scratch_copy)
        monkeypatch.setattr(script, "mutmut", self.mutmut)
        monkeypatch.setattr(script, "survivor_diffs", self.survivor_diffs)

    def scratch_copy(self, work):
        self.scratch = work
        (work / "pyproject.toml").write_text('[project]\nname = "copied"\n')
        return ["README.md", "reference_impls/", "tests/"]

    def mutmut(self, work, *args, capture=False):
        self.calls.append((work, args))
        self.configs.append((work / "pyproject.toml").read_text())
        return self.results if capture else ""

    def survivor_diffs(self, work, names):
        self.diff_requests.append((work, list(names)))
        return "".join(f"# {n}: survived\n{self.diffs[n]}\n\n" for n in names if n in self.diffs)

    def config(self):
        """The ``[tool.mutmut]`` table ``mutmut run`` found, the copied project's table kept."""
        tomllib = pytest.importorskip("tomllib")
        parsed = tomllib.loads(self.configs[0])
        assert parsed["project"]["name"] == "copied"
        return parsed["tool"]["mutmut"]


AW_9 = "reference_impls.weighting.aw.xǁAWǁobserve_validation_losses__mutmut_9"
AW_1 = "reference_impls.weighting.aw.xǁAWǁ__init____mutmut_1"
EW_4 = "reference_impls.weighting.ew.x_equal_weights__mutmut_4"


def test_a_run_configures_mutmut_in_the_scratch_copy_runs_it_with_two_workers_and_prints_the_table(
        monkeypatch, capsys):
    """The default run: the package's tests, 2 workers (the figure the docs quote), every status
    read back from ``mutmut results --all true`` and printed per module; no survivors file asked."""
    script = load_script("mutation_score")
    fake = FakeMutmut(script, monkeypatch)
    rows = script.main(["weighting"])
    assert [work for work, _ in fake.calls] == [fake.scratch, fake.scratch]
    assert [args for _, args in fake.calls] == [("run", "--max-children", "2"), ("results", "--all", "true")]
    config = fake.config()
    assert config["source_paths"] == ["reference_impls/weighting/"]
    assert config["pytest_add_cli_args_test_selection"] == ["tests/reference_impls/weighting/"]
    assert config["also_copy"] == ["README.md", "reference_impls/", "tests/"]
    assert "only_mutate" not in config
    assert (rows[-1].mutants, rows[-1].killed, rows[-1].survived) == (6, 3, 2)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "tests: tests/reference_impls/weighting/"
    assert printed[1:] == script.table(rows).splitlines()
    assert fake.diff_requests == []


def test_tests_and_workers_given_are_the_ones_mutmut_gets(monkeypatch, capsys):
    script = load_script("mutation_score")
    fake = FakeMutmut(script, monkeypatch, results="    reference_impls.metrics.x_delta_m__mutmut_3: killed\n")
    tests = ["tests/reference_impls/test_metrics.py", "tests/reference_impls/test_train.py"]
    script.main(["metrics", "--tests", *tests, "--workers", "3"])
    assert fake.calls[0][1] == ("run", "--max-children", "3")
    assert fake.config()["pytest_add_cli_args_test_selection"] == tests
    assert capsys.readouterr().out.splitlines()[0] == "tests: " + " ".join(tests)


def test_a_worker_count_that_is_not_a_number_is_refused_before_any_work(monkeypatch, capsys):
    script = load_script("mutation_score")
    fake = FakeMutmut(script, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["weighting", "--workers", "two"])
    assert exit_info.value.code == 2 and fake.calls == []


def test_survivors_writes_the_diff_of_each_survivor_and_of_nothing_else(monkeypatch, tmp_path, capsys):
    script = load_script("mutation_score")
    fake = FakeMutmut(script, monkeypatch, diffs={AW_9: "--- a\n+++ a\n-x\n+y", EW_4: "--- b\n+++ b\n-u\n+v"})
    written = tmp_path / "survivors.txt"
    script.main(["weighting", "--survivors", str(written)])
    assert fake.diff_requests == [(fake.scratch, [AW_9, EW_4])]
    assert list(script.survivor_blocks(written.read_text(), script.Target("weighting"))) == [AW_9, EW_4]


def test_a_rerun_runs_only_the_named_mutants_of_their_modules_and_counts_a_changed_one_as_other(
        monkeypatch, tmp_path, capsys):
    """``--rerun``: mutmut runs the file's mutants alone, ``only_mutate`` is their modules; the table
    counts those mutants only, and one whose diff is another edit now counts under "other", with
    the modules to run in full named on stderr."""
    script = load_script("mutation_score")
    rerun = SURVIVORS + f"# {AW_9}: survived\n--- reference_impls/weighting/aw.py\n-    y = 1\n+    y = 0\n\n"
    recorded = script.survivor_blocks(rerun, script.Target("weighting"))
    fake = FakeMutmut(script, monkeypatch, diffs={AW_1: recorded[AW_1], AW_9: "--- other\n-y\n+z",
                                                  EW_4: "--- other\n+++ other\n-p\n+q"})
    path = tmp_path / "survivors.txt"
    path.write_text(rerun)
    rows = script.main(["weighting", "--rerun", str(path)])
    assert fake.calls[0][1] == ("run", "--max-children", "2", AW_1, EW_4, AW_9)
    assert fake.config()["only_mutate"] == ["reference_impls/weighting/aw.py", "reference_impls/weighting/ew.py"]
    assert fake.diff_requests == [(fake.scratch, [AW_1, EW_4, AW_9])]
    by_module = {r.module: (r.mutants, r.killed, r.survived, r.other) for r in rows}
    assert by_module == {"aw": (2, 1, 0, 1), "ew": (1, 0, 0, 1), "all": (3, 1, 0, 2)}  # aw_1 is killed now
    err = capsys.readouterr().err.strip()
    assert err.startswith("2 named mutants are other edits now")
    assert err.endswith("run aw ew in full with --only")


def test_a_rerun_of_a_module_mutates_the_whole_module_and_names_no_only(monkeypatch, tmp_path, capsys):
    """A top-level module is one source file: a rerun sets no ``only_mutate``, and its changed
    mutants are to be rerun with the module alone (``--only`` is refused for a module)."""
    script = load_script("mutation_score")
    names = ["reference_impls.metrics.x_delta_m__mutmut_3", "reference_impls.metrics.x_delta_m__mutmut_4"]
    path = tmp_path / "survivors.txt"
    path.write_text("".join(f"# {n}: survived\n--- m\n+++ m\n-a\n+b\n\n" for n in names))
    fake = FakeMutmut(script, monkeypatch, results="".join(f"    {n}: survived\n" for n in names),
                      diffs={names[0]: "--- m\n+++ m\n-a\n+b", names[1]: "--- m\n+++ m\n-a\n+c"})
    rows = script.main(["metrics", "--rerun", str(path)])
    assert "only_mutate" not in fake.config()
    assert [(r.module, r.survived, r.other) for r in rows] == [("metrics", 1, 1), ("all", 1, 1)]
    assert capsys.readouterr().err.strip().endswith("run metrics in full")


# --- the three steps that touch the outside: git's file list, the mutmut executable, mutmut's diffs ---

def git(folder, *args):
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def test_the_scratch_copy_takes_tracked_and_new_files_but_not_ignored_ones(monkeypatch, tmp_path):
    """A small git checkout: tracked files (edited since the last commit: the edit is copied), a new file
    git does not ignore, and an ignored one; the copy names the top-level files and folders it made."""
    repo, work = tmp_path / "repo", tmp_path / "work"
    (repo / "pkg" / "sub").mkdir(parents=True)
    (repo / ".gitignore").write_text("build/\n*.log\n")
    (repo / "README.md").write_text("committed\n")
    (repo / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "first")
    (repo / "README.md").write_text("edited, not committed\n")
    (repo / "notes.txt").write_text("new\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_text("ignored\n")
    (repo / "run.log").write_text("ignored\n")
    script = load_script("mutation_score")
    monkeypatch.setattr(script, "REPO", repo)
    copied = script.scratch_copy(work)
    assert copied == [".gitignore", "README.md", "notes.txt", "pkg/"]
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()) == [
        ".gitignore", "README.md", "notes.txt", "pkg/sub/mod.py"]
    assert (work / "README.md").read_text() == "edited, not committed\n"
    assert (work / "pkg" / "sub" / "mod.py").stat().st_mtime == (repo / "pkg" / "sub" / "mod.py").stat().st_mtime


def test_the_scratch_copy_of_a_folder_that_is_no_git_checkout_fails_instead_of_copying_nothing(monkeypatch,
                                                                                                tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("not tracked anywhere\n")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a checkout above
    script = load_script("mutation_score")
    monkeypatch.setattr(script, "REPO", tmp_path / "repo")
    with pytest.raises(subprocess.CalledProcessError):
        script.scratch_copy(tmp_path / "work")


FAKE_MUTMUT = """#!/bin/sh
echo "ran in $(pwd) with: $*"
echo "a warning" >&2
exit "${FAKE_MUTMUT_EXIT:-0}"
"""


def fake_mutmut_beside_python(monkeypatch, tmp_path):
    """Point sys.executable at a folder where ``mutmut`` is a stand-in script; returns that folder."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    return bin_dir


def test_mutmut_is_looked_for_beside_this_python_and_a_missing_one_says_how_to_install_it(monkeypatch, tmp_path):
    script = load_script("mutation_score")
    fake_mutmut_beside_python(monkeypatch, tmp_path)
    with pytest.raises(SystemExit, match=r"mutmut is not installed: pip install -e '\.\[torch,dev,mutation\]'"):
        script.mutmut(tmp_path, "run")


def test_mutmut_runs_in_the_scratch_folder_and_returns_its_output_only_when_asked(monkeypatch, tmp_path):
    script = load_script("mutation_score")
    bin_dir = fake_mutmut_beside_python(monkeypatch, tmp_path)
    (bin_dir / "mutmut").write_text(FAKE_MUTMUT)
    (bin_dir / "mutmut").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    assert script.mutmut(work, "run", "--max-children", "2") == ""
    assert script.mutmut(work, "results", "--all", "true", capture=True) == f"ran in {work} with: results --all true\n"


def test_a_failing_mutmut_stops_the_run_naming_the_command_and_showing_both_outputs(monkeypatch, tmp_path):
    """mutmut says why on stdout (a failed clean run, a test's traceback): both streams are shown."""
    script = load_script("mutation_score")
    bin_dir = fake_mutmut_beside_python(monkeypatch, tmp_path)
    (bin_dir / "mutmut").write_text(FAKE_MUTMUT)
    (bin_dir / "mutmut").chmod(0o755)
    monkeypatch.setenv("FAKE_MUTMUT_EXIT", "3")
    with pytest.raises(SystemExit) as stop:
        script.mutmut(tmp_path, "run", "--max-children", "2", "a__mutmut_1", "b__mutmut_2", "c__mutmut_3")
    assert stop.value.code == (f"mutmut run --max-children 2 a__mutmut_1 ... (2 more) failed (3):\n"
                               f"ran in {tmp_path} with: run --max-children 2 a__mutmut_1 b__mutmut_2 c__mutmut_3\n"
                               "\na warning\n")
    with pytest.raises(SystemExit, match=r"^mutmut results --all true x failed \(3\):\n"):  # four: all shown
        script.mutmut(tmp_path, "results", "--all", "true", "x")
    with pytest.raises(SystemExit, match=r"^mutmut run a b c \.\.\. \(1 more\) failed \(3\):\n"):
        script.mutmut(tmp_path, "run", "a", "b", "c", "d")


FAKE_DIFF_APPLY = '''
def get_diff_for_mutant(name):
    if name == "broken__mutmut_1":
        raise ValueError("cannot read " + name)
    if name.startswith("gone"):
        raise FileNotFoundError(name)
    return f"--- a/x.py\\n+++ b/x.py\\n-{name} old\\n+{name} new"
'''


def fake_mutmut_package(work):
    """A stand-in ``mutmut.mutation.diff_apply`` in the scratch folder, where ``python -c`` imports it from."""
    (work / "mutmut" / "mutation").mkdir(parents=True)
    (work / "mutmut" / "__init__.py").write_text("")
    (work / "mutmut" / "mutation" / "__init__.py").write_text("")
    (work / "mutmut" / "mutation" / "diff_apply.py").write_text(FAKE_DIFF_APPLY)


def test_survivor_diffs_are_one_block_per_mutant_still_in_the_source(tmp_path):
    """A mutant whose line is gone from the source (FileNotFoundError) has no block: a rerun counts it as changed."""
    script = load_script("mutation_score")
    fake_mutmut_package(tmp_path)
    text = script.survivor_diffs(tmp_path, ["a__mutmut_1", "gone__mutmut_2", "b__mutmut_3"])
    assert text == ("# a__mutmut_1: survived\n--- a/x.py\n+++ b/x.py\n-a__mutmut_1 old\n+a__mutmut_1 new\n\n"
                    "# b__mutmut_3: survived\n--- a/x.py\n+++ b/x.py\n-b__mutmut_3 old\n+b__mutmut_3 new\n\n")
    with pytest.raises(SystemExit, match=r"(?s)^could not read the survivors' diffs:\n.*ValueError: cannot read"):
        script.survivor_diffs(tmp_path, ["a__mutmut_1", "broken__mutmut_1"])
