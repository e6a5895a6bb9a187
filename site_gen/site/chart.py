"""Papers per year per area as a stacked bar chart, laid out here and drawn by a template.

Each paper counts once, in the top-level section of its first topic. Every year between
the first and the last gets a bar (possibly empty) so the time axis is even.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ..catalogue import Catalogue

# Okabe-Ito colours (distinguishable with common colour-vision deficiencies), then two of Tol's.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#7f7f7f",
           "#882255", "#44AA99")
WIDTH, HEIGHT = 760, 340
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 48


@dataclass(frozen=True)
class Segment:
    area: str
    count: int
    y: float
    height: float
    colour: str


@dataclass(frozen=True)
class Bar:
    year: int
    total: int
    x: float
    width: float
    segments: list[Segment]
    label: bool  # print the year under this bar


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot_top: float
    plot_bottom: float
    plot_left: float
    plot_right: float
    bars: list[Bar]
    ticks: list[tuple[int, float]]  # (value, y)
    legend: list[tuple[str, str, int]]  # (area title, colour, papers)


def area_of(cat: Catalogue) -> dict[str, str | None]:
    """Paper id -> id of the top-level section of its first topic; None outside the taxonomy ("Other").
    Areas are told apart by id: titles need not be unique, and a section may be titled "Other"."""
    top = {s.id for s in cat.sections}
    return {p.id: area if (area := p.topics[0].split("/")[0]) in top else None for p in cat.papers}


def nice_step(maximum: int, ticks: int = 5) -> int:
    """A round tick step (1, 2, 5 x 10^k) giving about ``ticks`` gridlines."""
    raw = max(maximum, 1) / ticks
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def papers_per_year_chart(cat: Catalogue) -> Chart | None:
    if not cat.papers:
        return None
    areas, title = area_of(cat), {**{s.id: s.title for s in cat.sections}, None: "Other"}
    order = [s.id for s in cat.sections] + [None]
    colour = {area: PALETTE[i % len(PALETTE)] for i, area in enumerate(order)}
    counts = Counter((p.year, areas[p.id]) for p in cat.papers)
    years = range(min(p.year for p in cat.papers), max(p.year for p in cat.papers) + 1)
    totals = Counter(p.year for p in cat.papers)
    step = nice_step(max(totals.values()))
    top_value = step * math.ceil(max(totals.values()) / step)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(years)
    scale = plot_h / top_value
    label_every = max(1, math.ceil(len(years) / 15))
    bars = []
    for i, year in enumerate(years):
        y, segments = HEIGHT - BOTTOM, []
        for area in order:
            n = counts.get((year, area), 0)
            if n:
                y -= n * scale
                segments.append(Segment(title[area], n, round(y, 2), round(n * scale, 2), colour[area]))
        bars.append(Bar(year, totals.get(year, 0), round(LEFT + i * slot + slot * 0.1, 2), round(slot * 0.8, 2),
                        segments, label=(year - years[0]) % label_every == 0 or year == years[-1]))
    ticks = [(v, round(HEIGHT - BOTTOM - v * scale, 2)) for v in range(0, top_value + 1, step)]
    per_area = Counter(areas.values())
    legend = [(title[a], colour[a], per_area[a]) for a in order if per_area[a]]
    return Chart(WIDTH, HEIGHT, TOP, HEIGHT - BOTTOM, LEFT, WIDTH - RIGHT, bars, ticks, legend)
