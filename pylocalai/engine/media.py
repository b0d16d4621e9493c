"""Media (images, audio) in chat messages: read content parts of every protocol into one form, and
fetch the bytes they point at.

A message's media stay where they were among its text parts: the text gets one MEDIA_MARKER per
item, in order (llama.cpp's multimodal library splits the prompt there), and the message keeps the
items themselves under "media". Templates that do not render markers themselves (LocalAI's Go
templates) take the items from "media" and their own multimodal template.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pylocalai.errors import InvalidRequestError

MEDIA_MARKER = "<__media__>"  # llama.cpp's mtmd_default_marker()
MAX_MEDIA_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT_S = 30.0
_TEXT_PARTS = ("text", "input_text", "output_text")


@dataclass(frozen=True, slots=True)
class MediaRef:
    """One media item of a message: a data URI, an http(s) URL, or the bytes themselves."""

    kind: str  # "image" | "audio"
    source: str | bytes
    param: str = "messages"  # where it came from, for errors

    def load(self, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        return load_url(self.source, param=self.param, timeout_s=timeout_s)


def load_url(url: str, *, param: str, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """The bytes of a data URI (base64) or of an http(s) URL, at most MAX_MEDIA_BYTES."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidRequestError("a media data URI must be base64 (data:<type>;base64,...)", param=param)
        return decode_base64(payload, param)
    if url.startswith(("http://", "https://")):
        req = urllib.request.Request(url, headers={"User-Agent": "pylocalai"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # the scheme was checked above
                data = resp.read(MAX_MEDIA_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise InvalidRequestError(f"could not fetch media from {url}: {reason}", param=param) from None
        if len(data) > MAX_MEDIA_BYTES:
            raise InvalidRequestError(f"media at {url} is larger than {MAX_MEDIA_BYTES} bytes", param=param)
        return data
    raise InvalidRequestError("a media URL must be a data URI or an http(s) URL", param=param)


def decode_base64(payload: str, param: str) -> bytes:
    if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise InvalidRequestError(f"media larger than {MAX_MEDIA_BYTES} bytes", param=param)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("media data is not valid base64", param=param) from None


def _image_url(part: dict[str, Any], param: str) -> str:
    value = part.get("image_url", part.get("url"))
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise InvalidRequestError("an image part needs image_url.url (a data URI or an http(s) URL)", param=param)
    return value


def content_parts(content: Any, param: str = "messages") -> tuple[str, list[MediaRef]]:
    """OpenAI-style message content: the text (one MEDIA_MARKER per media part, in place) and the media.

    Text parts are concatenated; image parts are `image_url` / `image` / `input_image`
    (image_url as a string or {"url": ...}); audio parts are `input_audio` ({"data": base64}) or
    `audio_url`. Other part types are refused.
    """
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequestError("message content must be a string or an array of parts", param=param)
    text: list[str] = []
    media: list[MediaRef] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequestError("content parts must be objects with a type", param=param)
        kind = part["type"]
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError("a text part needs a string 'text'", param=where)
            text.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            text.append(part["refusal"])
        elif kind in ("image_url", "image", "input_image"):
            media.append(MediaRef("image", _image_url(part, where), where))
            text.append(MEDIA_MARKER)
        elif kind == "input_audio":
            audio = part.get("input_audio")
            data = audio.get("data") if isinstance(audio, dict) else None
            if not isinstance(data, str):
                raise InvalidRequestError("an input_audio part needs input_audio.data (base64)", param=where)
            media.append(MediaRef("audio", f"data:audio/wav;base64,{data}", where))  # decoded off the event loop
            text.append(MEDIA_MARKER)
        elif kind == "audio_url":
            url = part.get("audio_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise InvalidRequestError("an audio_url part needs audio_url.url", param=where)
            media.append(MediaRef("audio", url, where))
            text.append(MEDIA_MARKER)
        else:
            raise InvalidRequestError(f"unsupported content part type {kind!r}", param=where)
    return "".join(text), media


def split_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with OpenAI content parts → string content with markers, media under "media"."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, list):
            text, media = content_parts(content, f"messages[{i}].content")
            msg = dict(msg, content=text)
            if media:
                msg["media"] = list(msg.get("media") or []) + media
        out.append(msg)
    return out


def message_media(messages: Sequence[dict[str, Any]]) -> list[MediaRef]:
    return [ref for m in messages for ref in (m.get("media") or ())]


def without_media(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as a chat template takes them (the markers stay in the text)."""
    return [{k: v for k, v in m.items() if k != "media"} if "media" in m else m for m in messages]
