"""The evaluation gallery: one HTML page of the first records, images inline, every text escaped."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image

from jobs.scoring import RecordResult, accuracy

GALLERY_MAX_RECORDS = 50
THUMBNAIL_SIDE = 224


def thumbnail(image: Image.Image) -> str:
    """A base64 PNG of `image`, shrunk to fit THUMBNAIL_SIDE."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_gallery(
    results: list[RecordResult],
    thumbnails: list[list[str]],
    skipped: int = 0,
    title: str = "HoVLE evaluation",
) -> str:
    """An HTML page of the records that have thumbnails (answers are model output: all text is escaped)."""
    rows = []
    for result, images in zip(results, thumbnails):
        cells = "".join(f'<img src="data:image/png;base64,{t}" alt="">' for t in images)
        mark = '<td class="ok">✓</td>' if result.correct else '<td class="bad">✗</td>'
        values = (result.id, result.skill or "", result.question, result.expected, result.given)
        text = "".join(f"<td>{html.escape(value)}</td>" for value in values)
        rows.append(f"<tr><td>{cells}</td>{text}{mark}</tr>")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>'
        "body{font-family:sans-serif} td{border-top:1px solid #ccc;padding:4px;vertical-align:top;"
        "white-space:pre-wrap} img{margin:2px} .ok{color:green} .bad{color:red}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>accuracy {accuracy(results):.3f} on {len(results)} records "
        f"({skipped} skipped); the first {len(rows)} shown</p><table><tr><th>image</th><th>id</th>"
        f"<th>skill</th><th>question</th><th>expected</th><th>given</th><th></th></tr>{''.join(rows)}"
        "</table></body></html>\n"
    )
