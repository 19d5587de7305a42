"""Profiles on the Hugging Face Hub: download through huggingface_hub's cache, upload with HfApi.

Downloads honour the usual huggingface_hub settings: the cache (``HF_HUB_CACHE`` or
``cache_dir``), ``revision``, tokens, and offline mode (``HF_HUB_OFFLINE=1`` serves the file from
the cache or fails without touching the network).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ProfileNotFoundError
from .header import PROFILE_FILENAME

if TYPE_CHECKING:
    from ..head_profile import HeadProfile


def download_profile(
    repo_id: str,
    *,
    revision: str | None = None,
    filename: str = PROFILE_FILENAME,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Local path of ``filename`` in Hub model repository ``repo_id`` (downloaded or from the cache).

    Raises:
        ProfileNotFoundError: no such repository, revision or file, or not cached while offline;
            the huggingface_hub error is chained and summarised in the message.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from ..._version import __version__

    common = dict(revision=revision, cache_dir=cache_dir, token=token,
                  library_name="heterocache", library_version=__version__)
    try:  # the local cache first: no network, and huggingface_hub's retries only when needed
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, **common))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError) as err:
        from huggingface_hub import constants

        if local_files_only or constants.HF_HUB_OFFLINE or isinstance(err, HFValidationError):
            raise _not_found(repo_id, revision, filename, err) from err
    unreachable = _unreachable_reason()
    if unreachable is not None:  # fail in seconds, not after a minute of retries
        raise ProfileNotFoundError(
            f"Hub repository '{repo_id}': '{filename}' is not in the local cache and the Hub cannot be "
            f"reached ({unreachable}); set HF_HUB_OFFLINE=1 to look in the cache only"
        )
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            library_name="heterocache",
            library_version=__version__,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError) as err:
        raise _not_found(repo_id, revision, filename, err) from err
    return Path(path)


def _not_found(repo_id: str, revision: str | None, filename: str, err: Exception) -> ProfileNotFoundError:
    at = f" at revision {revision!r}" if revision else ""
    summary = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ProfileNotFoundError(
        f"Hub repository '{repo_id}'{at} has no usable '{filename}' ({type(err).__name__}: {summary})"
    )


def _unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint cannot be reached (a TCP connection within ``timeout`` seconds), or None.

    Behind a proxy the endpoint is not probed (the proxy decides), so None is returned.
    """
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{url.hostname}:{port}: {err.strerror or err}"
    return None


def push_to_hub(
    profile: "HeadProfile",
    repo_id: str,
    *,
    filename: str = PROFILE_FILENAME,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_repo: bool = True,
) -> Any:
    """Upload ``profile`` as ``filename`` to model repository ``repo_id``; returns the CommitInfo.

    With ``create_repo`` the repository is created when missing (``private`` applies then).
    Pushing to the model's own repository lets :func:`profile_for_model` find it by model name.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_file(
        path_or_fileobj=profile.to_bytes(),
        path_in_repo=filename,
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message or f"Add heterocache head profile of {profile.model_name}",
    )
