"""``python -m nagl``: the same as the ``nagl`` command."""

from nagl.cli.main import app

app()
