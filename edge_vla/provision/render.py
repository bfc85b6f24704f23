"""Fill the package templates (edge_vla/provision/templates/*).

`{{name}}` placeholders rather than string.Template's `$name`, because the templates are shell
scripts and systemd units full of `$VAR` that must stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources

from edge_vla.errors import ConfigError

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


def template(name: str) -> str:
    return (resources.files("edge_vla.provision") / "templates" / name).read_text(encoding="utf-8")


def render(text: str, values: Mapping[str, object]) -> str:
    """Substitute every placeholder; an unknown one is a bug in the template, so it raises."""
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ConfigError(f"template needs values for {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def render_template(name: str, values: Mapping[str, object]) -> str:
    return render(template(name), values)
