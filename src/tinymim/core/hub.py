"""The Hugging Face hub without the wait: offline, huggingface_hub retries a fetch with back-off for half a
minute to a minute before it gives up. tinymim asks first whether the hub can be reached at all (one TCP
connection, a few seconds at most) and, where it cannot, lets huggingface_hub answer from its cache at once
or fail at once, in one line. Light at import (huggingface_hub, sockets and urllib come when a hub name is in
play): the command line refuses an `hf-hub:` name it cannot fetch before torch and timm are imported.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Iterator

HUB_NAME_PREFIXES = ("hf-hub:", "hf_hub:")  # timm's names of a hub repository


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when it can (or a proxy stands
    between): one TCP connection to its endpoint, DNS included, given `timeout` seconds in all."""
    import urllib.parse
    import urllib.request  # http.client, email, ssl: imported when a hub name is in play, not at start-up

    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(host):
        return None  # the proxy is the one to ask: huggingface_hub does so
    return _probe(host, port, timeout)


@functools.cache  # once per process: a run may fetch several files, and the answer holds for its start-up
def _probe(host: str, port: int, timeout: float) -> str | None:
    import socket
    import threading

    outcome: dict[str, str | None] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except OSError as e:
            outcome["error"] = e.strerror or str(e) or type(e).__name__

    probe = threading.Thread(target=connect, daemon=True)  # a resolver that hangs is left behind, not waited for
    probe.start()
    probe.join(timeout)
    if "error" in outcome and outcome["error"] is None:
        return None
    return f"{host}:{port} cannot be reached ({outcome.get('error') or f'no answer in {timeout:g} s'})"


@contextlib.contextmanager
def hub_or_cache() -> Iterator[None]:
    """For a block that may fetch from the hub (a timm/hub name, pretrained=True): where the hub cannot
    be reached, huggingface_hub runs offline for the block, so its cache answers at once or the fetch
    fails at once; the OSError then says why."""
    from huggingface_hub import constants

    reason = None if constants.HF_HUB_OFFLINE else hub_unreachable()
    if reason is None:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    except OSError as e:
        raise OSError(f"{reason}, and the hub cache holds no copy") from e
    finally:
        constants.HF_HUB_OFFLINE = False


def offline_message(name: str, error: Exception) -> str:
    """One line for a timm/hub name whose config or weights cannot be fetched."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    first = (text.split(". ")[0] if text else type(error).__name__)[:200]
    return (f"cannot download {name!r} from the Hugging Face hub ({first}); offline or no network: "
            "download it where there is one (or point HF_HUB_CACHE at a cache that holds it), or give the "
            "weights as a file, e.g. teacher.checkpoint=model.safetensors with teacher.model.name=ARCHITECTURE")


def hub_names(tree: Any) -> list[str]:
    """The `hf-hub:` names among a config tree's values (a recipe with its overrides)."""
    if isinstance(tree, dict):
        return [name for value in tree.values() for name in hub_names(value)]
    if isinstance(tree, (list, tuple)):
        return [name for value in tree for name in hub_names(value)]
    return [tree] if isinstance(tree, str) and tree.startswith(HUB_NAME_PREFIXES) else []


def unfetchable(name: str) -> str | None:
    """Why `hf-hub:ORG/REPO` cannot be had here, or None when it may be: the hub cannot be reached and
    the hub cache holds nothing of the repository (what it holds, the full load reads)."""
    from huggingface_hub import constants

    repo = name.split(":", 1)[1].split("@", 1)[0].strip("/")
    cached = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    if cached.is_dir() and any(cached.iterdir()):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, and the hub cache holds no copy"
    reason = hub_unreachable()
    return None if reason is None else f"{reason}, and the hub cache holds no copy"
