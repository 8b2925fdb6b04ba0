"""Validation of the names that become folder names and URL segments."""

from __future__ import annotations

import re

from torchship.errors import InvalidNameError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# "latest" means the newest; the rest are the files kept beside the version folders.
_RESERVED = {"latest", "aliases.json", "stages.json", "policy.json", "history.jsonl"}


def validate_name(value: str, what: str = "model name") -> str:
    """Return ``value`` if it is safe as one path segment, else raise ``InvalidNameError``.

    Allowed: letters, digits, ``.``, ``_``, ``-``; up to 64 characters; not starting with
    a dot (so no ``..`` and no hidden temp folders); not a reserved word.
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise InvalidNameError(
            f"Invalid {what} {value!r}.",
            hint="Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        )
    if value.lower() in _RESERVED:
        raise InvalidNameError(f"{value!r} is a reserved word and cannot be a {what}.")
    return value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``"name[:version-or-alias]"`` into its parts, validating both."""
    name, _, version = ref.partition(":")
    validate_name(name)
    if version:
        if version != "latest":
            validate_name(version, "version or alias")
        return name, version
    return name, None
