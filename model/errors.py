"""The config error every loader raises, and the one format of its message, without torch or transformers:
a command that needs no model (`hovle synth`, `hovle --help`) starts in under a second, not ~6 s."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field and what was expected."""


def config_problems(err, prefix: str = "") -> str:
    """A pydantic `ValidationError` as one line: `section.field: what was wrong (got value)` per error,
    joined by "; " (the one error format of every run-config loader)."""
    problems = []
    for e in err.errors():
        field = ".".join(str(part) for part in (*([prefix] if prefix else []), *e["loc"]))
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        problems.append(f"{field or '<top>'}: {e['msg']}{got}")
    return "; ".join(problems)
