"""The paper's analysis from run directories alone: loading them (runs.py), cells and optima (select.py), tables
(tables.py), the paper's own tables (reference.py) and figures (figures.py). Imports core and recipe only, and
never torch: `harness analyze` runs on a login node with the light dependencies."""

from harness.analysis.select import Analysis, analyze  # noqa: E402,F401
from harness.analysis.tables import cells_csv, report, table_rows, to_csv, to_latex, to_markdown, write_outputs  # noqa: E402,F401
