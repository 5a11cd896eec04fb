"""A chart's figures (`Chart`, counted by `mailer.figures`), drawn as SVG and written as CSV;
no database.

Drawn by matplotlib's SVG backend: a well-kept, widely used library whose object interface
(a `Figure` and its own canvas, no pyplot state) is safe on the web's worker threads, whose
output is deterministic with a fixed hash salt and no date, and which writes no script and
links to nothing outside the file. Its SVG styles its shapes with `style` attributes, which
the console's Content-Security-Policy forbids inline, so each chart is its own
`image/svg+xml` response shown by an `<img>` with a text alternative, beside a table of the
same figures for screen readers and for anyone who wants the numbers.

Colours are the GOV.UK palette's; lines also differ by marker and bars by hatching, so no
series is told from another by colour alone.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from mailer.spreadsheet import csv_cell

COLOURS = ("#1d70b8", "#f47738", "#0b0c0c", "#00703c", "#4c2c92", "#d4351c", "#28a197",
           "#b58840", "#d53880", "#505a5f")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||")
WIDTH, HEIGHT = 8.0, 4.0  # inches at 72 points each: a 576 x 288 viewBox


@dataclass(frozen=True)
class Chart:
    """One chart's figures: a row per category (a month, a send, a quarter), a column per
    series. The table beside the chart, its CSV and its SVG are all drawn from this."""

    key: str  # names its routes and its CSV file
    title: str
    category: str  # the heading of the first column
    categories: list[str]
    series: list[tuple[str, list[int]]]
    kind: str = "bar"  # "bar" (grouped) or "line"
    note: str = ""
    ticks: list[str] | None = None  # shorter category labels under the chart's axis

    def rows(self) -> list[list[Any]]:
        return [[name, *(values[i] for _label, values in self.series)]
                for i, name in enumerate(self.categories)]

    def header(self) -> list[str]:
        return [self.category, *(label for label, _values in self.series)]

    def empty(self) -> bool:
        return not any(any(values) for _label, values in self.series)

    def describe(self) -> str:
        """What the picture shows, in a sentence, for its `alt`: the figures are in the
        table beside it."""
        if self.empty():
            return f"{self.title}: nothing to show yet."
        kind = "Line chart" if self.kind == "line" else "Bar chart"
        names = ", ".join(label for label, _values in self.series)
        return (f"{kind} of {self.title[0].lower()}{self.title[1:]} ({names}) over "
                f"{len(self.categories)} rows of the table beside it.")


def csv_text(chart: Chart) -> str:
    """The chart's figures for a spreadsheet: its table's header and rows, each cell safe
    from formula injection (a category is a send's title, which people write)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([csv_cell(cell) for cell in chart.header()])
    for row in chart.rows():
        writer.writerow([csv_cell(cell) for cell in row])
    return out.getvalue()


def svg(chart: Chart) -> bytes:
    """The chart as a standalone SVG document."""
    # Imported here, not at the top: the worker, the scheduler and the command line never
    # draw, and matplotlib takes a noticeable part of a second to import.
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    settings = matplotlib.rcParams
    settings["svg.fonttype"] = "none"  # text stays text: smaller, and the viewer's own font
    settings["svg.hashsalt"] = "msht-charts"  # the same figures give the same bytes
    settings["font.family"] = "sans-serif"
    figure = Figure(figsize=(WIDTH, HEIGHT))
    FigureCanvasSVG(figure)
    axes = figure.add_subplot()
    positions = list(range(len(chart.categories)))
    if chart.kind == "line":
        for i, (label, values) in enumerate(chart.series):
            axes.plot(positions, values, label=label, color=COLOURS[i % len(COLOURS)],
                      marker=MARKERS[i % len(MARKERS)], linewidth=2)
    else:
        count = max(1, len(chart.series))
        width = 0.8 / count
        for i, (label, values) in enumerate(chart.series):
            offset = (i - (count - 1) / 2) * width
            axes.bar([p + offset for p in positions], values, width, label=label,
                     color=COLOURS[i % len(COLOURS)], hatch=HATCHES[i % len(HATCHES)],
                     edgecolor="#ffffff", linewidth=0.5)
    axes.set_xticks(positions, chart.ticks or chart.categories, rotation=30, ha="right")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of people: no halves
    axes.set_ylim(bottom=0)
    axes.set_title(chart.title, loc="left", fontsize=12)
    axes.grid(axis="y", color="#b1b4b6", linewidth=0.5)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    if chart.series:
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    else:
        axes.text(0.5, 0.5, "Nothing to show yet", transform=axes.transAxes, ha="center")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="svg", metadata=_metadata(chart))
    return out.getvalue()


def _metadata(chart: Chart) -> dict[str, Any]:
    # No date (the same figures, the same file) and no "Creator" naming the library version.
    return {"Title": chart.title, "Date": None, "Creator": None, "Type": None, "Format": None}
