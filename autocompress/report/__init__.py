"""Reports of a Result: the Pareto front as a terminal table (with the baseline, the budgets and which budget
binds each model), CSV, JSON, and one self-contained HTML file with inline SVG figures.

The modules, each importing only those after it: `formats` (`render`: one report in one of FORMATS), `html` (the
HTML page), `tables` (terminal table, CSV, JSON), `hypervolume` (moocore's, on normalized objectives), `plots`
(the SVG figures, by hand). Each reads a `Result` (result.py), which renders itself with `render`
(`Result.report`): the result is passed in, never imported.
"""
from .formats import FORMATS, render
from .html import field_title, to_html
from .hypervolume import hypervolume, hypervolume_history, normalized, reference_point
from .tables import SHOWN, binding, budget_line, closest, closest_table, format_table, pareto_table, to_csv, to_json

__all__ = ["FORMATS", "SHOWN", "binding", "budget_line", "closest", "closest_table", "field_title", "format_table",
           "hypervolume", "hypervolume_history", "normalized", "pareto_table", "reference_point", "render", "to_csv",
           "to_html", "to_json"]
