"""Everything the commands print: progress, tables, the workers' lines."""

