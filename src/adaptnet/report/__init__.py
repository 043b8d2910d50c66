"""Reports: ``report.md`` and PNG plots rendered from the files in a run directory.

It reads run directories only; it imports nothing from the training or model code.
"""

from adaptnet.report._markdown import (
    compare_table,
    markdown_table,
    write_compare,
    write_report,
)

__all__ = ["compare_table", "markdown_table", "write_compare", "write_report"]
