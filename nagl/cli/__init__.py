"""The ``nagl`` command line. Each module adds its commands through ``register(app)``."""
