"""Media: images from files, stdin and URLs, as packed RGB pixels for the engine.

``images`` reads and decodes (one-line errors, caps, EXIF orientation); ``url``
fetches http(s) images, imported only for URLs. Uses nothing of vlmduo but ``errors``.
"""
