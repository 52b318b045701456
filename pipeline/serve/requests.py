"""What `POST /v1/predict` accepts, checked before anything is queued; every refusal is one line naming the
item and the field.

JSON: {"items": [{"item_id": ..., "title": "...", "description": "..." | null, "image": "<base64>" | null}]}
Multipart form: fields `title`, `description`, `item_id` and one file `image` (one item).

A photo arrives as its bytes only (base64 in JSON, a file part in a form): the server never opens a file whose
path a client sent. Bytes that are not an image are refused here, not classified as "no photo".
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from pipeline.items import is_image

FIELDS = ("item_id", "title", "description", "image")


class Refused(Exception):
    """A request refused: its HTTP status, one line, and the kind counted in the metrics."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Item(BaseModel):
    """One product to classify."""

    model_config = ConfigDict(extra="forbid")
    item_id: StrictInt | StrictStr | None = Field(None, description="echoed back in the answer")
    title: StrictStr
    description: StrictStr | None = None
    image: StrictStr | None = Field(None, description="the photo's bytes, base64-encoded (never a path)")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: Annotated[list[Item], Field(min_length=1)]


def _where(loc: tuple) -> str:
    """("items", 2, "image") -> "items[2].image"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _one_line(err: ValidationError) -> str:
    e = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")[0]
    where = _where(e["loc"])
    if e["type"] == "extra_forbidden":
        hint = " (photos come as base64 in `image`: the server never opens a path)" if "path" in where else ""
        return f"{where}: unknown field; an item has {', '.join(FIELDS)}{hint}"
    if e["type"] == "missing":
        return f"{where}: missing"
    if not e["loc"]:
        return 'body: expected a JSON object {"items": [{"title": ..., ...}, ...]}'
    if e["loc"][-1] == "items" or isinstance(e["loc"][-1], int):
        return f"{where}: {e['msg'][0].lower()}{e['msg'][1:]} (a list of items, each an object)"
    return f"{where}: {e['msg'][0].lower()}{e['msg'][1:]}"


def photo(text: str | None, where: str) -> bytes | None:
    """The bytes of a base64 photo, refused (422) unless they are an image."""
    if text is None:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(422, f"{where}: not valid base64 (a photo comes as its bytes in base64; the server never "
                           f"opens a path)", "bad_image") from None
    return checked(data, where)


def checked(data: bytes, where: str) -> bytes | None:
    if not data:
        return None
    if not is_image(data):
        raise Refused(422, f"{where}: not an image (JPEG, PNG, WebP, ... bytes expected)", "bad_image")
    return data


def parse_json(body: bytes, max_items: int) -> tuple[list, list[dict]]:
    """(the items' ids, the items as the Predictor reads them) from a JSON body."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise Refused(400, f"body: not valid JSON ({str(err).splitlines()[0][:120]})", "bad_json") from None
    if isinstance(raw, dict) and isinstance(raw.get("items"), list) and len(raw["items"]) > max_items:
        raise Refused(413, f"items: {len(raw['items'])} items, at most {max_items} in one request; send several "
                           f"requests", "too_many_items")
    try:
        request = PredictRequest.model_validate(raw)
    except ValidationError as err:
        raise Refused(422, _one_line(err), "bad_field") from None
    items = [{"title": it.title, "description": it.description, "image": photo(it.image, f"items[{i}].image")}
             for i, it in enumerate(request.items)]
    return [it.item_id for it in request.items], items


async def parse_form(form) -> tuple[list, list[dict]]:
    """One item from a multipart form (fields title, description, item_id; file image)."""
    for key in form.keys():
        if key not in FIELDS:
            raise Refused(422, f"form.{key}: unknown field; a form has {', '.join(FIELDS)}", "bad_field")
    values = {}
    for key in ("item_id", "title", "description"):
        value = form.get(key)
        if value is not None and not isinstance(value, str):
            raise Refused(422, f"form.{key}: expected a text field, got a file", "bad_field")
        values[key] = value
    if values["title"] is None:
        raise Refused(422, "form.title: missing", "bad_field")
    upload = form.get("image")
    data = None
    if upload is not None:
        if isinstance(upload, str):
            raise Refused(422, "form.image: expected a file part (the photo's bytes), got a text field; the "
                               "server never opens a path", "bad_field")
        data = checked(await upload.read(), "form.image")
    return [values["item_id"]], [{"title": values["title"], "description": values["description"], "image": data}]
