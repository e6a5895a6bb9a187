"""Turn the public QM9 download into the ``<root>/qm9.npz`` that :mod:`reference_impls.data.qm9` reads.

    python -m reference_impls.data.qm9_convert RAW_DIR ROOT [--targets COLUMN ...] [--max-atoms 29]

RAW_DIR holds the files of the DeepChem/MoleculeNet ``qm9.zip`` as PyTorch Geometric unpacks
them into its ``raw/`` folder:

    gdb9.sdf             one V2000 molfile per molecule (3-D coordinates in Å), each ending in $$$$;
                         its first line names the molecule, gdb_<n>
    gdb9.sdf.csv         a header (mol_id,A,B,C,mu,alpha,homo,...), then one row per molecule,
                         in the order of gdb9.sdf
    uncharacterized.txt  optional: the 3054 molecules that failed the geometry consistency check,
                         a table whose first column is n of gdb_<n> (counted from 1); they are skipped

Features (one vector per molecule, ``max_atoms + 5`` long): the eigenvalues of the Coulomb matrix
(Rupp et al., PRL 108, 058301, 2012), ordered by descending absolute value and zero-padded to
``max_atoms``, then the number of H, C, N, O and F atoms. The matrix depends on the numbering and
orientation of the atoms; its eigenvalues do not, which is why they are the features. Distances
are converted from Å to Bohr, the atomic units of Rupp et al.

Targets are csv columns in the csv's own units (energies in Hartree). By default the 11
properties of the multi-task literature, stored under the names the loaders use: mu, alpha,
homo, lumo, r2, zpve, U0 (u0), U (u298), H (h298), G (g298), cv. No split is written, so the
loader draws its seeded 80/10/10 split.

Every fault in the raw files is a :class:`DataError` that names the file, the line and the
molecule; ``qm9.npz`` is written whole or not at all.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DataError

BOHR_PER_ANGSTROM = 1 / 0.529177210903  # CODATA 2018 Bohr radius, in Å
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}  # all QM9 holds; the counts follow this order
DEFAULT_TARGETS = {"mu": "mu", "alpha": "alpha", "homo": "homo", "lumo": "lumo", "r2": "r2", "zpve": "zpve",
                   "u0": "U0", "u298": "U", "h298": "H", "g298": "G", "cv": "cv"}  # csv column: archive name
RAW_LAYOUT = ("RAW_DIR/gdb9.sdf and RAW_DIR/gdb9.sdf.csv (DeepChem's qm9.zip), optionally "
              "RAW_DIR/uncharacterized.txt; for a PyTorch Geometric download RAW_DIR is its raw/ folder")


@dataclass(frozen=True)
class Molecule:
    name: str  # the record's first line, gdb_<n>
    line: int  # where the record starts in the SDF file, counted from 1
    symbols: tuple[str, ...]
    positions: np.ndarray  # (atoms, 3), Å


@dataclass(frozen=True)
class Summary:
    path: Path
    written: int
    skipped: int | None  # None: there was no uncharacterized.txt
    features: int
    targets: tuple[str, ...]

    def line(self) -> str:
        skipped = ("no uncharacterized.txt, none skipped" if self.skipped is None
                   else f"{self.skipped} skipped as uncharacterized")
        return (f"wrote {self.path}: {self.written} molecules ({skipped}), "
                f"{self.features} features, {len(self.targets)} targets ({', '.join(self.targets)})")


# ---- features -------------------------------------------------------------------------------


def coulomb_matrix(charges: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """0.5 Z_i^2.4 on the diagonal (Rupp et al.'s fit to the energies of free atoms), Z_i Z_j / |R_i - R_j|
    off it, with ``positions`` in Å and the distances in Bohr."""
    z = np.asarray(charges, dtype=np.float64)
    bohr = np.asarray(positions, dtype=np.float64) * BOHR_PER_ANGSTROM
    distance = np.linalg.norm(bohr[:, None, :] - bohr[None, :, :], axis=-1)
    np.fill_diagonal(distance, 1.0)  # the diagonal is overwritten below; this only avoids 0/0
    matrix = np.outer(z, z) / distance
    np.fill_diagonal(matrix, 0.5 * z**2.4)
    return matrix


def coulomb_eigenvalues(charges: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """The matrix's eigenvalues by descending absolute value, zero-padded to ``size``: unlike the
    matrix they do not change when the atoms are renumbered, rotated or moved."""
    values = np.linalg.eigvalsh(coulomb_matrix(charges, positions))
    values = values[np.argsort(-np.abs(values), kind="stable")]
    return np.pad(values, (0, size - len(values)))


def molecule_features(molecule: Molecule, max_atoms: int) -> np.ndarray:
    """Coulomb eigenvalues (``max_atoms``), then the counts of H, C, N, O, F."""
    charges = np.array([ELEMENTS[s] for s in molecule.symbols])
    counts = [molecule.symbols.count(symbol) for symbol in ELEMENTS]
    return np.concatenate([coulomb_eigenvalues(charges, molecule.positions, max_atoms), counts])


# ---- gdb9.sdf -------------------------------------------------------------------------------


def text_lines(path: Path) -> Iterator[str]:
    """The file's lines without their line ends; a file that is not text is a DataError."""
    try:
        with path.open(encoding="utf-8-sig") as file:
            for line in file:
                yield line.rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a text file ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None


def sdf_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where it starts, its lines) for each molecule, cut at the ``$$$$`` lines."""
    lines: list[str] = []
    start = 1
    for number, line in enumerate(text_lines(path), 1):
        if line.strip() == "$$$$":
            yield start, lines
            lines, start = [], number + 1
        else:
            lines.append(line)
    if any(line.strip() for line in lines):
        yield start, lines  # the last molecule lacks its $$$$: parsing says what else it lacks


def parse_molecule(path: Path, start: int, lines: list[str]) -> Molecule:
    """One V2000 molfile: name, program and comment lines, the counts line, then as many atom and
    bond lines as it says, then ``M  END``. A count that disagrees with the blocks is an error,
    not a molecule silently missing atoms or taking a bond line for one."""
    name = lines[0].strip() if lines else ""

    def at(index: int) -> str:
        return f"{path}:{start + index}: molecule {name or '(unnamed)'}"

    if len(lines) < 4:
        raise DataError(f"{at(0)}: {len(lines)} line(s) before $$$$, expected a V2000 molfile "
                        "(name, program, comment and counts lines, atoms, bonds, M  END)")
    atoms, bonds = _counts(lines[3], at(3))
    symbols, positions = [], []
    for index in range(4, 4 + atoms):
        atom = _atom(lines[index]) if index < len(lines) else None
        if atom is None:
            raise DataError(f"{at(index)}: the counts line says {atoms} atoms, but atom {index - 3} is "
                            f"{shown(lines, index)}, not an atom line (x, y, z in columns 1-30, the element in 32-34)")
        if atom[0] not in ELEMENTS:
            raise DataError(f"{at(index)}: unknown element {atom[0]!r}; QM9 holds {', '.join(ELEMENTS)} only")
        symbols.append(atom[0])
        positions.append(atom[1])
    after = 4 + atoms
    if after < len(lines) and _atom(lines[after]) is not None:
        raise DataError(f"{at(after)}: the counts line says {atoms} atoms, but atom line {atoms + 1} follows")
    _check_bonds(lines, after, bonds, atoms, at)
    return Molecule(name, start, tuple(symbols), np.array(positions, dtype=np.float64).reshape(-1, 3))


def shown(lines: list[str], index: int) -> str:
    """Line ``index`` of a molecule, quoted, for an error message."""
    return repr(lines[index]) if index < len(lines) else "the end of the molecule"


def _counts(line: str, where: str) -> tuple[int, int]:
    """Atoms (columns 1-3) and bonds (4-6) of a V2000 counts line."""
    try:
        atoms, bonds = int(line[0:3]), int(line[3:6])
    except ValueError:
        atoms = bonds = -1
    if atoms < 1 or bonds < 0 or not line.rstrip().endswith("V2000"):
        raise DataError(f"{where}: {line!r} is not a V2000 counts line "
                        "(atoms in columns 1-3, bonds in 4-6, V2000 at the end)")
    return atoms, bonds


def _atom(line: str) -> tuple[str, tuple[float, float, float]] | None:
    """(element, x, y, z) of a V2000 atom line, or None for any other line."""
    try:
        xyz = (float(line[0:10]), float(line[10:20]), float(line[20:30]))
    except ValueError:
        return None
    symbol = line[31:34].strip()
    return (symbol, xyz) if symbol.isalpha() else None


def _check_bonds(lines: list[str], first: int, bonds: int, atoms: int, at: Callable[[int], str]) -> None:
    """``bonds`` lines joining two of the atoms, then the property block that ends in ``M  END``."""
    for index in range(first, first + bonds):
        text = lines[index] if index < len(lines) else ""
        try:
            ends = int(text[0:3]), int(text[3:6])
        except ValueError:
            ends = (0, 0)
        if not all(1 <= end <= atoms for end in ends):
            raise DataError(f"{at(index)}: the counts line says {bonds} bonds, but bond {index - first + 1} is "
                            f"{shown(lines, index)}, not a bond between two of its {atoms} atoms")
    rest = lines[first + bonds:]
    if not rest or not rest[0].startswith("M  ") or not any(line.strip() == "M  END" for line in rest):
        raise DataError(f"{at(first + bonds)}: expected M  END after {atoms} atoms and {bonds} bonds, "
                        f"got {shown(lines, first + bonds)}")


# ---- gdb9.sdf.csv and uncharacterized.txt ---------------------------------------------------


@dataclass(frozen=True)
class Row:
    line: int
    mol_id: str
    values: tuple[float, ...]


def csv_rows(path: Path, columns: Sequence[str]) -> Iterator[Row]:
    """mol_id and the values of ``columns`` of each row, picked by the header's names (the DeepChem
    qm9.csv has a smiles column the sdf.csv lacks: positions would shift, names do not)."""
    reader = csv.reader(text_lines(path))
    header = [name.strip() for name in next(reader, [])]
    missing = [c for c in ("mol_id", *columns) if c not in header]
    if missing:
        raise DataError(f"{path}:1: no column {', '.join(missing)} in the header; it has: "
                        f"{', '.join(header) or 'nothing'}")
    picks = [header.index(c) for c in columns]
    for cells in reader:
        if not cells:  # a blank line
            continue
        where = f"{path}:{reader.line_num}"
        if len(cells) != len(header):
            raise DataError(f"{where}: {cells[0]}: {len(cells)} values, but the header names {len(header)} columns")
        mol_id = cells[header.index("mol_id")].strip()
        yield Row(reader.line_num, mol_id, tuple(_number(cells[k], header[k], f"{where}: {mol_id}") for k in picks))


def _number(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: column {column} holds {text!r}, expected a finite number")
    return value


def uncharacterized(path: Path) -> set[int]:
    """The n of each gdb_<n> in the table of uncharacterized.txt: prose, a ruled header naming
    ``Index``, then one row per molecule starting with its index. Rows are read after the header
    rather than from a fixed line number, so a changed preamble cannot shift them."""
    lines = list(text_lines(path))
    header = next((k for k, line in enumerate(lines) if "Index" in line.split()), None)
    if header is None:
        raise DataError(f"{path}: no table header naming Index; expected the list of uncharacterized molecules "
                        "(figshare file 3195404), a table whose first column is the n of gdb_<n>")
    indices = set()
    for number, line in enumerate(lines[header + 1:], header + 2):
        first = line.split()[0] if line.strip() else ""
        if first == "" or set(first) <= set("=-"):  # blank lines and rules
            continue
        if not first.isdigit():
            raise DataError(f"{path}:{number}: expected a row starting with a molecule index, got {line.strip()!r}")
        indices.add(int(first))
    return indices


# ---- conversion -----------------------------------------------------------------------------


def raw_files(raw_dir: Path) -> tuple[Path, Path, Path | None]:
    """gdb9.sdf, gdb9.sdf.csv and uncharacterized.txt (None when absent)."""
    sdf, table, skip = raw_dir / "gdb9.sdf", raw_dir / "gdb9.sdf.csv", raw_dir / "uncharacterized.txt"
    for path in (sdf, table):
        if not path.is_file():
            raise DataError(f"{path}: missing; expected {RAW_LAYOUT}")
    return sdf, table, skip if skip.is_file() else None


def paired(sdf: Path, table: Path, columns: Sequence[str]) -> Iterator[tuple[int, str, tuple[int, list[str]], Row]]:
    """(position, name, (first line, SDF lines), csv row) per molecule; the two files must list the same molecules in
    the same order, or every target would be attached to the wrong molecule."""
    records, rows = sdf_records(sdf), csv_rows(table, columns)
    for position in itertools.count(1):
        record, row = next(records, None), next(rows, None)
        if record is None and row is None:
            return
        if record is None:
            raise DataError(f"{table}:{row.line}: {row.mol_id} has no molecule in {sdf}, which ends after "
                            f"{position - 1} molecules; expected one csv row per molecule, in the same order")
        name = record[1][0].strip() if record[1] else ""
        if row is None:
            raise DataError(f"{sdf}:{record[0]}: molecule {position} ({name}) has no row in {table}, which ends "
                            f"after {position - 1} rows; expected one csv row per molecule, in the same order")
        if name != row.mol_id:
            raise DataError(f"{sdf}:{record[0]}: molecule {position} is {name!r} but row {position} of {table} "
                            f"(line {row.line}) is {row.mol_id!r}; expected the same molecules in the same order")
        yield position, name, record, row


def gdb_number(name: str, where: str) -> int:
    """n of gdb_<n>: the index uncharacterized.txt uses (from 1; PyTorch Geometric once read it from 0)."""
    match = re.fullmatch(r"gdb_(\d+)", name)
    if match is None:
        raise DataError(f"{where}: molecule {name!r} is not named gdb_<n>, so uncharacterized.txt cannot "
                        "say whether to skip it")
    return int(match.group(1))


def read_raw(raw_dir: Path, columns: Sequence[str], max_atoms: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Features and targets of the characterized molecules, and how many were skipped (None without
    uncharacterized.txt)."""
    sdf, table, skip_file = raw_files(raw_dir)
    skip = uncharacterized(skip_file) if skip_file else set()
    features, targets, skipped = [], [], 0
    for position, name, (start, lines), row in paired(sdf, table, columns):
        if skip and gdb_number(name, f"{sdf}:{start}") in skip:
            skipped += 1
            continue
        molecule = parse_molecule(sdf, start, lines)
        if len(molecule.symbols) > max_atoms:
            raise DataError(f"{sdf}:{start}: molecule {name} has {len(molecule.symbols)} atoms, more than "
                            f"--max-atoms {max_atoms}")
        vector = molecule_features(molecule, max_atoms)
        if not np.isfinite(vector).all():
            raise DataError(f"{sdf}:{start}: molecule {name}: two atoms at the same place (or a coordinate "
                            "that is not a number) make its Coulomb matrix infinite")
        features.append(vector)
        targets.append(row.values)
    if not features:
        raise DataError(f"{sdf}: no molecules to write ({skipped} skipped as uncharacterized)")
    return np.stack(features), np.array(targets, dtype=np.float64), skipped if skip_file else None


def write_archive(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``<root>/qm9.npz`` whole or not at all: written beside it under another name, then renamed
    over it (atomic within one file system); a failure removes the partial file."""
    target = root / "qm9.npz"
    partial = root / f".qm9.npz.{os.getpid()}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as file:
            np.savez(file, **arrays)
        os.replace(partial, target)
    except OSError as error:
        raise DataError(f"{target}: could not be written ({type(error).__name__}: {error})") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def convert(raw_dir: str | Path, root: str | Path, targets: Sequence[str] | None = None,
            max_atoms: int = 29) -> Summary:
    """Read the raw files, featurise every characterized molecule and write ``<root>/qm9.npz``."""
    columns = list(targets) if targets else list(DEFAULT_TARGETS)
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"--targets: {', '.join(repeated)} given more than once; each column is one task")
    features, values, skipped = read_raw(Path(raw_dir), columns, max_atoms)
    names = tuple(DEFAULT_TARGETS.get(c, c) for c in columns)
    path = write_archive(Path(root), {"features": features, "targets": values, "target_names": np.array(names)})
    return Summary(path, len(features), skipped, features.shape[1], names)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impls.data.qm9_convert",
                                     description="Write ROOT/qm9.npz from the public QM9 files in RAW_DIR.")
    parser.add_argument("raw_dir", metavar="RAW_DIR", type=Path, help=RAW_LAYOUT)
    parser.add_argument("root", metavar="ROOT", type=Path, help="where qm9.npz is written (--root of the harness)")
    parser.add_argument("--targets", nargs="+", metavar="COLUMN", default=None,
                        help=f"gdb9.sdf.csv columns to predict (default: {' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--max-atoms", type=_positive, default=29,
                        help="Coulomb eigenvalues per molecule; QM9's largest has 29 atoms (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.raw_dir, args.root, args.targets, args.max_atoms)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
