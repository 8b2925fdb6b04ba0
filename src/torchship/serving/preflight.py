"""The checks ``torchship serve`` makes before it starts a server.

They run in the process that supervises the workers, so they import no torch (most of a
start-up) unless the settings need it: a CUDA device to check, a handler to import, a
``.mar`` archive to find.
"""

from __future__ import annotations

from torchship.serving.settings import ServeSettings, archive_spec
from torchship.store import ModelStore, parse_ref


def preflight(settings: ServeSettings) -> None:
    """Refuse, before a server starts, what would keep it from ever being ready: a model
    or version not in the store, an archive that is not there, an unknown device, a
    handler that cannot be imported. Cheap: nothing is loaded."""
    store = ModelStore(settings.store)
    if settings.device not in ("auto", "cpu"):  # those two are always valid
        from torchship.devices import resolve_device

        resolve_device(settings.device)
    for ref in settings.models:
        archive = archive_spec(ref)
        if archive is not None:
            from torchship.serving.mar_models import resolve_archive_path

            resolve_archive_path(archive[1], settings.model_store)
            continue
        name, version = parse_ref(ref)
        store.resolve(name, version)
    if settings.handlers:
        from torchship.serving.handlers import load_handler

        for spec in settings.handlers.values():
            load_handler(spec)
