"""The ``onp`` command line: engine commands plus service and client commands.

``onp_core`` stays free of web code; this package composes the engine's typer app
with the commands that start the service (serve, keys) and talk to it (submit, …).
"""
