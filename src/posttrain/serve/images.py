"""Images in chat requests (`image_url` content parts) for a vision-language model: a data URL is decoded here; an
http(s) URL is fetched only when the server runs with --allow-remote-images (a server that downloads what any
client names can be made to reach other machines, so it is off by default); a local path or file:// URL is always
refused (a client must not read the server's files). What is wrong is a 400 naming the part."""
from __future__ import annotations

import base64
import urllib.error
import urllib.request

from ..data.vision import is_data_url, is_remote, open_image
from . import responses as r

FETCH_TIMEOUT_S = 10


def request_images(urls: list[tuple[str, str]], allow_remote: bool, max_bytes: int) -> list[str]:
    """Each (url, where) as a data URL the engine reads, checked to decode as an image."""
    refs = []
    for url, where in urls:
        if is_data_url(url):
            ref = url
        elif is_remote(url) and url.lower().startswith(("http://", "https://")):
            if not allow_remote:
                raise r.APIError(400, f"{where}: remote image URLs are refused by this server (start it with "
                                      "--allow-remote-images to fetch them); send the image as a data URL "
                                      "(data:image/png;base64,...)", param=where, code="remote_image_refused")
            ref = fetch(url, where, max_bytes)
        else:
            raise r.APIError(400, f"{where}: an image must be a data URL (data:image/png;base64,...) or, on a server "
                                  "started with --allow-remote-images, an http(s) URL; local paths are refused",
                             param=where, code="invalid_image_url")
        try:
            open_image(ref)
        except ValueError as exc:
            raise r.APIError(400, f"{where}: {exc}", param=where, code="invalid_image") from None
        refs.append(ref)
    return refs


def fetch(url: str, where: str, max_bytes: int) -> str:
    """The image at an http(s) URL as a data URL; at most `max_bytes` (the server's body limit) are read."""
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise r.APIError(400, f"{where}: could not fetch {url[:200]}: {exc}", param=where,
                         code="image_fetch_failed") from None
    if len(data) > max_bytes:
        raise r.APIError(400, f"{where}: the image at {url[:200]} is larger than {max_bytes} bytes", param=where,
                         code="image_too_large")
    return "data:image/unknown;base64," + base64.b64encode(data).decode()
