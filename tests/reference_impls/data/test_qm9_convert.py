"""The QM9 converter, on tiny raw files written here in the public format (gdb9.sdf, gdb9.sdf.csv,
uncharacterized.txt); nothing is downloaded."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reference_impls import train
from reference_impls.data import DataError, qm9
from reference_impls.data.qm9_convert import (DEFAULT_TARGETS, coulomb_eigenvalues, coulomb_matrix, convert,
                                              main)

# QM9's first molecules (gdb_1 methane, gdb_2 ammonia, gdb_3 water) and hydrogen fluoride, in Å,
# the central atom first so that the bonds join it to the others.
MOLECULES = {
    "methane": [("C", -0.0127, 1.0858, 0.0080), ("H", 0.0022, -0.0060, 0.0020), ("H", 1.0117, 1.4638, 0.0003),
                ("H", -0.5408, 1.4475, -0.8766), ("H", -0.5238, 1.4379, 0.9064)],
    "ammonia": [("N", -0.0404, 1.0241, 0.0626), ("H", 0.0173, 0.0125, -0.0274), ("H", 0.9158, 1.3587, -0.0288),
                ("H", -0.5203, 1.3435, -0.7755)],
    "water": [("O", -0.0343, 0.9775, 0.0076), ("H", 0.0648, 0.0206, 0.0015), ("H", 0.8718, 1.3008, 0.0007)],
    "fluoride": [("F", 0.0, 0.0, 0.0), ("H", 0.0, 0.0, 0.9168)],
}
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
COLUMNS = "A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,u0_atom,u298_atom,h298_atom,g298_atom".split(",")
UNCHARACTERIZED_HEAD = """

List of molecules among the 133885 GDB9 molecules for which the Corina generated Cartesian coordinates
and the B3LYP/6-31G(2df,p) equilibrium geometry lead to different SMILES and InChI strings.

========================================================================================
#   Index          GDB17 SMILES        SMILES for B3LYP XYZ       SMILES for Corina XYZ        D_IJ
========================================================================================
"""
UNCHARACTERIZED_FOOT = "========================================================================================\n"


def molfile(name, atoms, pairs=None):
    """One V2000 record as RDKit writes them into gdb9.sdf: the first atom bonded to the others,
    unless ``pairs`` names the bonds (atoms counted from 1)."""
    pairs = pairs or [(1, k) for k in range(2, len(atoms) + 1)]
    bonds = [f"{i:3d}{j:3d}  1  0" for i, j in pairs]
    lines = [name, "     RDKit          3D", "", f"{len(atoms):3d}{len(bonds):3d}  0  0  0  0  0  0  0  0999 V2000"]
    lines += [f"{x:10.4f}{y:10.4f}{z:10.4f} {el:<3} 0  0  0  0  0  0  0  0  0  0  0  0" for el, x, y, z in atoms]
    return "\n".join([*lines, *bonds, "M  END", "$$$$"]) + "\n"


def value(number, column):
    """A value that says which molecule (gdb_<number>) and which column it came from."""
    return number * 100 + COLUMNS.index(column)


def csv_text(numbers, header=("mol_id", *COLUMNS)):
    rows = [",".join(header)]
    rows += [",".join([f"gdb_{n}", *(("C" if c == "smiles" else str(value(n, c))) for c in header[1:])])
             for n in numbers]
    return "\n".join(rows) + "\n"


def write_raw(raw, molecules, skip=None, numbers=None):
    """gdb9.sdf and gdb9.sdf.csv for ``molecules`` (gdb_1, gdb_2, ...), and uncharacterized.txt
    listing ``skip``."""
    numbers = numbers or range(1, len(molecules) + 1)
    raw.mkdir(exist_ok=True)
    (raw / "gdb9.sdf").write_text("".join(molfile(f"gdb_{n}", atoms) for n, atoms in zip(numbers, molecules)))
    (raw / "gdb9.sdf.csv").write_text(csv_text(numbers))
    if skip is not None:
        rows = "".join(f"{n:8d}              CC(=N)O             CC(=N)O          C[C@H](N)[O]     4.2{n}\n"
                       for n in skip)
        (raw / "uncharacterized.txt").write_text(UNCHARACTERIZED_HEAD + rows + UNCHARACTERIZED_FOOT)
    return raw


def charges_positions(atoms):
    return np.array([Z[a[0]] for a in atoms]), np.array([a[1:] for a in atoms])


def moved(atoms, seed, renumber_all=False):
    """The same molecule rotated, translated and its atoms renumbered (but for the first, which
    the bonds of :func:`molfile` need, unless ``renumber_all``)."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    positions = charges_positions(atoms)[1] @ rotation.T + rng.normal(size=3)
    order = rng.permutation(len(atoms)) if renumber_all else [0, *(1 + rng.permutation(len(atoms) - 1))]
    return [(atoms[k][0], *positions[k]) for k in order]


def test_coulomb_matrix_of_two_atoms_by_hand():
    """CO at 1.128 Å = 2.13163 Bohr: diagonal 0.5 * 6^2.4 = 36.8581 and 0.5 * 8^2.4 = 73.5167,
    off the diagonal 6 * 8 / 2.13163 = 22.5180 (Z_i Z_j over the distance in Bohr)."""
    matrix = coulomb_matrix(np.array([6, 8]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.128]]))
    assert matrix == pytest.approx(np.array([[36.8581, 22.5180], [22.5180, 73.5167]]), rel=1e-5)
    mean, half = (36.8581 + 73.5167) / 2, np.hypot((73.5167 - 36.8581) / 2, 22.5180)  # 2x2 eigenvalues
    values = coulomb_eigenvalues(np.array([8, 6]), np.array([[0.0, 0.0, 1.128], [0.0, 0.0, 0.0]]), size=4)
    assert values == pytest.approx([mean + half, mean - half, 0.0, 0.0], rel=1e-5)


def test_eigenvalues_do_not_change_when_atoms_are_renumbered_rotated_or_moved():
    charges, positions = charges_positions(MOLECULES["methane"])
    for seed in range(3):
        other_charges, other_positions = charges_positions(moved(MOLECULES["methane"], seed, renumber_all=True))
        assert other_charges.tolist() != charges.tolist()  # the carbon is no longer first
        assert not np.allclose(coulomb_matrix(charges, positions), coulomb_matrix(other_charges, other_positions))
        assert coulomb_eigenvalues(other_charges, other_positions, 29) == pytest.approx(
            coulomb_eigenvalues(charges, positions, 29), rel=1e-9, abs=1e-9)
    values = coulomb_eigenvalues(charges, positions, 29)
    assert list(np.abs(values[:5])) == sorted(np.abs(values[:5]), reverse=True) and not values[5:].any()


def test_archive_features_are_eigenvalues_then_element_counts(tmp_path):
    molecules = [*MOLECULES.values(), moved(MOLECULES["water"], 7)]
    summary = convert(write_raw(tmp_path / "raw", molecules), tmp_path / "root")
    data = qm9.read(tmp_path / "root")
    assert summary.written == 5 and summary.features == 34 and data["features"].shape == (5, 34)
    assert summary.skipped is None and "(no uncharacterized.txt, none skipped)" in summary.line()
    counts = data["features"][:, 29:]  # H, C, N, O, F
    assert counts.tolist() == [[4, 1, 0, 0, 0], [3, 0, 1, 0, 0], [2, 0, 0, 1, 0], [1, 0, 0, 0, 1], [2, 0, 0, 1, 0]]
    for row, atoms in zip(data["features"], molecules):
        charges = np.array([Z[a[0]] for a in atoms])
        assert row[:29].sum() == pytest.approx(0.5 * (charges**2.4).sum())  # trace: the diagonal only
        assert not row[len(atoms):29].any()  # zero padding
    assert data["features"][4] == pytest.approx(data["features"][2], abs=1e-3)  # water, moved (4 decimals in Å)


def test_targets_are_the_named_csv_columns_in_order(tmp_path):
    raw = write_raw(tmp_path / "raw", list(MOLECULES.values()))
    convert(raw, tmp_path / "root")
    data = qm9.read(tmp_path / "root")
    assert data["target_names"].tolist() == ["mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv"]
    expected = [[value(n, c) for c in DEFAULT_TARGETS] for n in range(1, 5)]
    assert data["targets"].tolist() == expected and "split" not in np.load(tmp_path / "root" / "qm9.npz").files
    (raw / "gdb9.sdf.csv").write_text(csv_text(range(1, 5), ("mol_id", "smiles", *COLUMNS)))  # MoleculeNet's qm9.csv
    convert(raw, tmp_path / "root", targets=["gap", "A"])
    data = qm9.read(tmp_path / "root")
    assert data["target_names"].tolist() == ["gap", "A"]
    assert data["targets"].tolist() == [[value(n, "gap"), value(n, "A")] for n in range(1, 5)]


def test_uncharacterized_molecules_are_skipped_by_their_gdb_number(tmp_path):
    """uncharacterized.txt counts from 1, like gdb_<n>: listing 2 and 4 keeps gdb_1, gdb_3, gdb_5."""
    molecules = [MOLECULES["methane"], MOLECULES["ammonia"], MOLECULES["water"], MOLECULES["fluoride"],
                 MOLECULES["water"]]
    summary = convert(write_raw(tmp_path / "raw", molecules, skip=[2, 4]), tmp_path / "root")
    data = qm9.read(tmp_path / "root")
    assert summary.written == 3 and summary.skipped == 2
    assert data["targets"][:, 0].tolist() == [value(n, "mu") for n in (1, 3, 5)]
    assert data["features"][:, 29:].tolist() == [[4, 1, 0, 0, 0], [2, 0, 0, 1, 0], [2, 0, 0, 1, 0]]


def test_a_lone_atom_has_its_free_atom_energy_as_only_eigenvalue(tmp_path):
    """A 1x1 Coulomb matrix is its diagonal, 0.5 Z^2.4; one atom (and so no bond) is still a molecule."""
    convert(write_raw(tmp_path / "raw", [MOLECULES["water"], [("C", 0.5, -0.25, 2.0)]]), tmp_path / "root")
    features = np.load(tmp_path / "root" / "qm9.npz")["features"]  # too few molecules for qm9.read's split
    assert features[1, 0] == pytest.approx(0.5 * 6**2.4) and not features[1, 1:29].any()
    assert features[1, 29:].tolist() == [0, 1, 0, 0, 0]


def test_fixed_columns_hold_100_atoms_and_coordinates_ten_characters_wide(tmp_path):
    """V2000 fields are read by column, not split on blanks: a ring of 100 carbons (counts line
    '100100', bonds ' 99100' and '100  1') far from the origin, where '-1012.3456' fills all ten
    columns of a coordinate, converts to the eigenvalues of the coordinates as written."""
    angle = np.arange(100) * 2 * np.pi / 100
    radius = 1.5 / (2 * np.sin(np.pi / 100))  # 1.5 Å between neighbours
    circle = radius * np.stack([np.cos(angle), np.sin(angle), np.zeros(100)], axis=1)
    tilt, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    positions = np.round(circle @ tilt.T - 1000.0, 4)
    assert all((np.abs(positions[:, k]) >= 1000).any() and (np.abs(positions[:, k]) < 1000).any() for k in range(3))
    atoms = [("C", *xyz) for xyz in positions]
    raw = write_raw(tmp_path / "raw", [atoms])
    ring = [(k, k + 1) for k in range(1, 100)] + [(100, 1)]
    (raw / "gdb9.sdf").write_text(molfile("gdb_1", atoms, ring))
    assert "100100" in (raw / "gdb9.sdf").read_text() and "-1" in (raw / "gdb9.sdf").read_text()
    convert(raw, tmp_path / "root", max_atoms=100)
    features = np.load(tmp_path / "root" / "qm9.npz")["features"]
    assert features.shape == (1, 105) and features[0, 100:].tolist() == [0, 100, 0, 0, 0]
    assert features[0, :100] == pytest.approx(coulomb_eigenvalues(np.full(100, 6), positions, 100), rel=1e-9)


def test_bom_crlf_trailing_blanks_and_blank_lines_convert_like_clean_files(tmp_path):
    """Raw files re-saved by other tools (a UTF-8 byte order mark, CRLF line ends, blanks after V2000,
    blank lines inside the csv and the uncharacterized table) hold the same data, so they give the
    same archive."""
    molecules = list(MOLECULES.values())
    convert(write_raw(tmp_path / "clean", molecules, skip=[2]), tmp_path / "clean_root")
    raw = write_raw(tmp_path / "raw", molecules, skip=[2])
    sdf = (raw / "gdb9.sdf").read_text().replace("V2000\n", "V2000  \n")
    (raw / "gdb9.sdf").write_bytes(b"\xef\xbb\xbf" + sdf.replace("\n", "\r\n").encode())
    header, *rows = (raw / "gdb9.sdf.csv").read_text().splitlines(keepends=True)
    (raw / "gdb9.sdf.csv").write_bytes(b"\xef\xbb\xbf" + "".join([header, rows[0], "\n", *rows[1:]]).encode())
    table = (raw / "uncharacterized.txt").read_text()
    (raw / "uncharacterized.txt").write_text(table.replace(UNCHARACTERIZED_FOOT, "\n" + UNCHARACTERIZED_FOOT) + "\n\n")
    summary = convert(raw, tmp_path / "root")
    assert summary.written == 3 and summary.skipped == 1
    clean, data = qm9.read(tmp_path / "clean_root"), qm9.read(tmp_path / "root")
    assert data["features"].tolist() == clean["features"].tolist()
    assert data["targets"].tolist() == clean["targets"].tolist()


def test_max_atoms_equal_to_the_largest_molecule_is_enough_on_the_command_line_too(tmp_path):
    """--max-atoms is a maximum (methane's 5 atoms fit in 5), it sets the feature length (5 + 5 counts)
    from the command line as from convert(), and ROOT is created with its parents."""
    raw = write_raw(tmp_path / "raw", list(MOLECULES.values()))
    summary = convert(raw, tmp_path / "a" / "root", max_atoms=5)
    assert summary.features == 10 and qm9.read(tmp_path / "a" / "root")["features"].shape == (4, 10)
    assert main([str(raw), str(tmp_path / "b" / "c" / "root"), "--max-atoms", "5"]) == 0
    assert qm9.read(tmp_path / "b" / "c" / "root")["features"].shape == (4, 10)


def test_a_raw_file_that_cannot_be_read_is_a_data_error(tmp_path, monkeypatch):
    raw = write_raw(tmp_path / "raw", list(MOLECULES.values()))
    opened = Path.open

    def refuse_csv(path, *args, **kwargs):
        if path.name == "gdb9.sdf.csv":
            raise PermissionError(13, "Permission denied")
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_csv)
    with pytest.raises(DataError, match=r"gdb9.sdf.csv: cannot be read .*Permission denied"):
        convert(raw, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_converted_archive_trains_through_the_harness(tmp_path):
    molecules = [moved(atoms, seed) for seed in range(3) for atoms in MOLECULES.values()]  # 12 molecules
    convert(write_raw(tmp_path / "raw", molecules), tmp_path / "root", targets=["mu", "gap", "u0"])
    bench = qm9.benchmark(tmp_path / "root")
    assert bench.problem.tasks == ("mu", "gap", "U0") and bench.problem.input_shape == (34,)
    result = train.main(["--data", "qm9", "--root", str(tmp_path / "root"), "--epochs", "1", "--batch-size", "4",
                         "--no-progress", "--device", "cpu"])
    assert set(result["multi_task"]) == {"mu/abs_err", "gap/abs_err", "U0/abs_err"}
    assert all(np.isfinite(v) for v in result["multi_task"].values())


def replace_line(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def break_counts(raw, atoms):
    """gdb_2 (ammonia, 4 atoms) claims ``atoms`` atoms."""
    replace_line(raw / "gdb9.sdf", "  4  3  0", f"{atoms:3d}  3  0")


def cut_sdf(raw, after, lines_after):
    """gdb9.sdf ends ``lines_after`` lines after the (one) line that holds ``after``."""
    lines = (raw / "gdb9.sdf").read_text().splitlines(keepends=True)
    [index] = [k for k, line in enumerate(lines) if after in line]
    (raw / "gdb9.sdf").write_text("".join(lines[:index + lines_after]))


def empty_first_record(raw):
    """A $$$$ with nothing before it, paired with a csv row whose mol_id is empty: the names agree, the
    record is still no molecule."""
    (raw / "gdb9.sdf").write_text("$$$$\n" + (raw / "gdb9.sdf").read_text())
    header, *rows = (raw / "gdb9.sdf.csv").read_text().splitlines(keepends=True)
    (raw / "gdb9.sdf.csv").write_text("".join([header, ",".join(["", *"0" * len(COLUMNS)]) + "\n", *rows]))


def rename_gdb_3(raw):
    """gdb_3 renamed in both files: they still agree, but uncharacterized.txt cannot be applied to it."""
    write_raw(raw, list(MOLECULES.values()), skip=[9])
    replace_line(raw / "gdb9.sdf", "gdb_3\n", "water\n")
    replace_line(raw / "gdb9.sdf.csv", "gdb_3,", "water,")


BROKEN = {  # how to break the raw files of gdb_1..gdb_4, and words the error must hold
    "no_sdf": (lambda raw: (raw / "gdb9.sdf").unlink(), ["gdb9.sdf: missing", "gdb9.sdf.csv", "raw/ folder"]),
    "no_csv": (lambda raw: (raw / "gdb9.sdf.csv").unlink(), ["gdb9.sdf.csv: missing"]),
    "counts_too_few_atoms": (lambda raw: break_counts(raw, 3),
                             ["gdb9.sdf:23:", "gdb_2", "says 3 atoms", "atom line 4"]),
    "counts_too_many_atoms": (lambda raw: break_counts(raw, 5),
                              ["gdb9.sdf:24:", "gdb_2", "says 5 atoms", "'  1  2  1  0'"]),
    "counts_too_many_bonds": (lambda raw: replace_line(raw / "gdb9.sdf", "  4  3  0", "  4  4  0"),
                              ["gdb9.sdf:27:", "gdb_2", "says 4 bonds", "bond 4 is 'M  END'"]),
    "counts_too_few_bonds": (lambda raw: replace_line(raw / "gdb9.sdf", "  4  3  0", "  4  2  0"),
                             ["gdb9.sdf:26:", "gdb_2", "expected M  END", "got '  1  4  1  0'"]),
    "counts_not_numbers": (lambda raw: replace_line(raw / "gdb9.sdf", "  4  3  0", "  x  3  0"),
                           ["gdb9.sdf:19:", "gdb_2", "not a V2000 counts line"]),
    "counts_no_atoms": (lambda raw: replace_line(raw / "gdb9.sdf", "  4  3  0", "  0  3  0"),
                        ["gdb9.sdf:19:", "gdb_2", "not a V2000 counts line"]),
    # the file ends inside gdb_4 (hydrogen fluoride, from line 40): after its first atom line, after both
    "ends_among_atoms": (lambda raw: cut_sdf(raw, " F   0", 1), ["gdb9.sdf:45:", "gdb_4", "atom 2 is"]),
    "ends_after_atoms": (lambda raw: cut_sdf(raw, "    0.9168 H   0", 1), ["gdb9.sdf:46:", "gdb_4", "bond 1 is"]),
    "empty_record": (empty_first_record, ["gdb9.sdf:1:", "0 line(s) before $$$$"]),
    "atoms_coincide": (lambda raw: replace_line(raw / "gdb9.sdf", "    0.0648    0.0206    0.0015",
                                                "   -0.0343    0.9775    0.0076"),
                       ["gdb9.sdf:29:", "gdb_3", "Coulomb matrix infinite"]),
    "not_v2000": (lambda raw: replace_line(raw / "gdb9.sdf", "  4  3  0  0  0  0  0  0  0  0999 V2000",
                                           "  4  3  0  0  0  0  0  0  0  0999 V3000"),
                  ["gdb9.sdf:19:", "gdb_2", "not a V2000 counts line"]),
    "unknown_element": (lambda raw: replace_line(raw / "gdb9.sdf", " N   0", " Cl  0"),
                        ["gdb9.sdf:20:", "gdb_2", "unknown element 'Cl'"]),
    "no_m_end": (lambda raw: (raw / "gdb9.sdf").write_text((raw / "gdb9.sdf").read_text()[:-12]),
                 ["gdb9.sdf:47:", "gdb_4", "expected M  END"]),
    "csv_short": (lambda raw: (raw / "gdb9.sdf.csv").write_text(csv_text(range(1, 4))),
                  ["gdb9.sdf:40:", "molecule 4 (gdb_4) has no row", "gdb9.sdf.csv", "after 3 rows"]),
    "csv_long": (lambda raw: (raw / "gdb9.sdf.csv").write_text(csv_text(range(1, 6))),
                 ["gdb9.sdf.csv:6:", "gdb_5 has no molecule", "after 4 molecules"]),
    "csv_order": (lambda raw: (raw / "gdb9.sdf.csv").write_text(csv_text([1, 3, 2, 4])),
                  ["gdb9.sdf:16:", "molecule 2 is 'gdb_2'", "gdb9.sdf.csv (line 3) is 'gdb_3'"]),
    "csv_not_a_number": (lambda raw: replace_line(raw / "gdb9.sdf.csv", ",303,", ",n/a,"),
                         ["gdb9.sdf.csv:4:", "gdb_3", "column mu holds 'n/a'"]),
    "csv_nan": (lambda raw: replace_line(raw / "gdb9.sdf.csv", ",303,", ",nan,"), ["gdb9.sdf.csv:4:", "finite"]),
    "csv_short_row": (lambda raw: replace_line(raw / "gdb9.sdf.csv", ",318\n", "\n"),
                      ["gdb9.sdf.csv:4: gdb_3:", "19 values", "names 20 columns"]),
    "uncharacterized_row": (lambda raw: (raw / "uncharacterized.txt").write_text(
        UNCHARACTERIZED_HEAD + "     2  C\n   see above\n" + UNCHARACTERIZED_FOOT),
        ["uncharacterized.txt:10:", "expected a row starting with a molecule index", "'see above'"]),
    "uncharacterized_all": (lambda raw: write_raw(raw, list(MOLECULES.values()), skip=[1, 2, 3, 4]),
                            ["gdb9.sdf: no molecules to write", "4 skipped"]),
    "uncharacterized_name_not_gdb": (rename_gdb_3, ["gdb9.sdf:29:", "'water' is not named gdb_<n>"]),
    "csv_empty": (lambda raw: (raw / "gdb9.sdf.csv").write_text(""), ["gdb9.sdf.csv:1:", "no column mol_id"]),
    "sdf_not_text": (lambda raw: (raw / "gdb9.sdf").write_bytes(b"gdb_1\n\xff\xfe\x00\x81\n"),
                     ["gdb9.sdf: not a text file"]),
    "uncharacterized_without_table": (lambda raw: (raw / "uncharacterized.txt").write_text("2\n3\n"),
                                      ["uncharacterized.txt: no table header naming Index"]),
}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # atoms_coincide
@pytest.mark.parametrize("case", BROKEN)
def test_a_fault_in_the_raw_files_names_file_line_and_molecule_and_writes_nothing(tmp_path, case):
    breaks, words = BROKEN[case]
    raw = write_raw(tmp_path / "raw", list(MOLECULES.values()))
    breaks(raw)
    with pytest.raises(DataError) as raised:
        convert(raw, tmp_path / "root")
    message = str(raised.value)
    assert str(raw) in message and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "root").exists()


def test_options_that_the_raw_files_cannot_meet(tmp_path):
    raw = write_raw(tmp_path / "raw", list(MOLECULES.values()))
    with pytest.raises(DataError, match=r"gdb9.sdf:1: molecule gdb_1 has 5 atoms, more than --max-atoms 4"):
        convert(raw, tmp_path / "root", max_atoms=4)
    with pytest.raises(DataError, match=r"gdb9.sdf.csv:1: no column U0, spin in the header; it has: mol_id, A, B"):
        convert(raw, tmp_path / "root", targets=["mu", "U0", "spin"])
    with pytest.raises(DataError, match="--targets: mu given more than once"):
        convert(raw, tmp_path / "root", targets=["mu", "gap", "mu"])
    assert not (tmp_path / "root").exists()


def test_a_failed_write_keeps_the_old_archive_and_leaves_no_partial_file(tmp_path, monkeypatch):
    raw, root = write_raw(tmp_path / "raw", list(MOLECULES.values())), tmp_path / "root"
    convert(raw, root)
    before = (root / "qm9.npz").read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(DataError, match=r"qm9.npz: could not be written \(OSError: .*No space left on device"):
        convert(raw, root, targets=["gap"])
    assert [p.name for p in root.iterdir()] == ["qm9.npz"] and (root / "qm9.npz").read_bytes() == before


def test_command_line_prints_one_line_and_exits_non_zero_on_a_fault(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw", list(MOLECULES.values()), skip=[3])
    assert main([str(raw), str(tmp_path / "root"), "--targets", "mu", "gap"]) == 0
    out = capsys.readouterr().out
    assert out == (f"wrote {tmp_path / 'root' / 'qm9.npz'}: 3 molecules (1 skipped as uncharacterized), "
                   "34 features, 2 targets (mu, gap)\n")
    (raw / "gdb9.sdf.csv").unlink()
    assert main([str(raw), str(tmp_path / "new")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {raw / 'gdb9.sdf.csv'}: missing")
    done = subprocess.run([sys.executable, "-m", "reference_impls.data.qm9_convert", str(raw), str(tmp_path / "new")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {raw / 'gdb9.sdf.csv'}: missing; expected RAW_DIR/gdb9.sdf")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_max_atoms_accepts_one_and_refuses_zero():
    """--max-atoms takes any positive integer: a single atom (H2 has two, but a lone ion has one) is allowed."""
    from argparse import ArgumentTypeError

    from reference_impls.data.qm9_convert import _positive

    assert _positive("1") == 1 and _positive("29") == 29
    with pytest.raises(ArgumentTypeError, match="positive integer, got 0"):
        _positive("0")
