"""The Hugging Face Hub as every module sees it: what a hub id looks like, and whether the hub answers.

`is_hub_id` decides whether a name can be a hub repository (`name` or
`owner/name`); `rlhf.models.resolve_model` and `rlhf.data_sources.is_local` ask
it before treating a name as a model or dataset on the hub. `unreachable` asks
the hub endpoint (`HF_ENDPOINT`), or another URL such as a detoxify checkpoint's
(`rlhf.safety`), once, within a bounded time, so that an offline machine fails in
seconds instead of waiting out the libraries' retries.

Import cost: the standard library only; huggingface_hub is imported inside `unreachable`, when it probes the hub.
"""

from __future__ import annotations

import re

# ASCII letters, digits, `_`, `.` and `-`, at most one `/`; each part starts with a letter or digit.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub repository id (`name` or `owner/name`); nothing is looked up."""
    return _HUB_ID.fullmatch(name) is not None


def unreachable(timeout: float, url: str | None = None) -> str | None:
    """None when `url` (default: the hub endpoint) answers (any HTTP status), else why not; bounded even when DNS
    hangs.

    One HEAD request (redirects followed, as a download would follow them) runs in a daemon thread given
    `timeout + 2` seconds in all, because `urlopen`'s own timeout does not cover name resolution.
    """
    import threading
    import urllib.error
    import urllib.request

    if url is None:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return outcome[0] if outcome else f"no answer within {timeout + 2:.0f} s"
