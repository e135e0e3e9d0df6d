"""`dove-vlm serve`: a web page to ask a VLM about an image and see what the visual tokens cost.

`handler` answers one request with no web framework involved; `app` lays the page out with Gradio
(the `serve` extra) around it.
"""
