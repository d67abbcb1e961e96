"""The ops' switches: each set by an argument, else by an environment variable (declared in
``altclip_fast.environment``, with its default), else that default."""

from __future__ import annotations

from .. import environment


def choose(value: str | None, env_var: str, choices: tuple[str, ...], argument: str) -> str:
    """``value``, else ``$env_var``, else ``choices[0]``: stripped, lower-cased and checked against
    ``choices``. A bad value is a ValueError that names where it came from."""
    name = (environment.get(env_var) if value is None else value).strip().lower()
    if name not in choices:
        where = env_var if value is None else argument
        raise ValueError(f"{where} must be one of {', '.join(choices)}, got {name!r}")
    return name
