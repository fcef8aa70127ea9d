"""The report page and the figures drawn for it."""

