"""`GET /media/<sha256>.<ext>`: the images of the media store (`mailer.media`).

A name is the hash of the file's content, so a URL never changes what it shows: it is cached
for a year as immutable. Only names of the store's own form are looked up, so no path a
request names can leave the media folder.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from mailer import media
from mailer.config import Settings

CACHE = "public, max-age=31536000, immutable"


def router(settings: Settings) -> APIRouter:
    routes = APIRouter()

    @routes.get(media.URL_PATH + "{name}", include_in_schema=False)
    async def media_file(name: str) -> FileResponse:
        path = media.stored_path(settings, name)
        if path is None:
            raise HTTPException(404)
        return FileResponse(path, media_type=media.CONTENT_TYPES[path.suffix[1:]],
                            headers={"Cache-Control": CACHE})

    return routes
