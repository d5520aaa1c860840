"""Stand-in for ComfyUI's server.py: PromptServer.instance and send_sync (line 1152).

`messages` is stand-in only: every (event, data, sid) sent, for the tests.
"""


class PromptServer:
    instance = None

    def __init__(self):
        PromptServer.instance = self
        self.client_id = "standin-client"
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))
