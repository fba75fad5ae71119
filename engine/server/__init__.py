"""The local job server the Blender add-on talks to (`realfusion serve`).

`jobs` is the queue and its worker (no web framework); `app` the FastAPI routes of API v1;
`schemas` the request and response models. FastAPI and uvicorn come with the `server` extra.
"""
