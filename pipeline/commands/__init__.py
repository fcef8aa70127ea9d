"""One module per command: each joins the packages below it into one use case."""

