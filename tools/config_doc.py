"""The documented node.toml table, generated from :data:`engine.cluster.config.DEFAULT_TOML`.

``python -m tools.config_doc`` prints the Markdown table (one row per key:
the key, its default, its unit, and the comment above it in DEFAULT_TOML;
a key DEFAULT_TOML leaves commented out has a default per role).
tests/test_runbook.py checks that docs/operations/configuration.md holds exactly this
table, so a new or changed setting cannot go undocumented.
"""

from __future__ import annotations

import json
import re

from engine.cluster.config import DEFAULTS, DEFAULT_TOML, ROLE_DEFAULTS

__all__ = ["settings", "markdown_table"]


def settings() -> list[tuple[str, str, object, str]]:
    """(section, key, default, comment) for every key, in file order."""
    out = []
    section = ""
    comment: list[str] = []
    for line in DEFAULT_TOML.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section, comment = m[1], []
        elif (m := re.fullmatch(r"#\s*(\w+)\s*=.*", line)) and (section, m[1]) in ROLE_DEFAULTS:
            out.append((section, m[1], DEFAULTS[section][m[1]], " ".join(comment)))  # unset: by role
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("# "))
        elif m := re.fullmatch(r"(\w+)\s*=.*", line):
            if section:
                out.append((section, m[1], DEFAULTS[section][m[1]], " ".join(comment)))
            comment = []
        elif not line:
            comment = []
    return out


def _unit(key: str, default: object, comment: str) -> str:
    choices = [w for w in re.findall(r'"(\w+)"', comment)]
    if isinstance(default, str) and default in choices:
        return " or ".join(f"`{w}`" for w in dict.fromkeys(choices))
    if isinstance(default, bool):
        return "true/false"
    if key.endswith("_s"):
        return "seconds"
    if key.endswith("_bytes"):
        return "bytes"
    if key.endswith("listen"):
        return "HOST:PORT"
    if key == "peers":
        return "list of HOST:PORT"
    if key in ("file", "secret_file", "tls_cert", "tls_key"):
        return "path"
    if key.startswith("max_sessions"):
        return "sessions"
    if key == "sync_replicas":
        return "replicas"
    return "text"


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[]" if not value else json.dumps(value)
    return str(value)


def markdown_table() -> str:
    rows = ["| key | default | unit | meaning |", "|---|---|---|---|"]
    for section, key, default, comment in settings():
        if (section, key) in ROLE_DEFAULTS:
            by_role = ROLE_DEFAULTS[(section, key)]
            shown = ", ".join(f"`{_literal(v)}` ({role})" for role, v in by_role.items())
            unit = _unit(key, by_role["master"], comment)
        else:
            shown, unit = f"`{_literal(default)}`", _unit(key, default, comment)
        rows.append(f"| `[{section}] {key}` | {shown} | {unit} | {comment.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
