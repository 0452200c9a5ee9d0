"""`python -m radrl …`: the same as the `radrl` command."""

from radrl.cli import app

app()
