"""Stand-in for comfy_api/latest/_ui.py (ComfyUI v0.8.0): PreviewText (line 455)."""


class _UIOutput:
    def as_dict(self) -> dict:
        raise NotImplementedError


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}
