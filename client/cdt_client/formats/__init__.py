"""The wire and file formats of the CDT service, defined once for the server and the client:
`tensors` (npy and safetensors headers), `files` (latents and frames files), `video` (the
display-size tag and rotation of video frames), `api` (media types, session chunk headers,
error codes, seed bounds).

numpy and the standard library only, and nothing else of ours: the client carries these
modules as they are, and the server's `media`, `service` and CLI import them from here.
"""
