"""Stand-in for ComfyUI's server module: the PromptServer instance nodes send progress text through."""


class PromptServer:
    instance = None

    def __init__(self):
        self.progress_texts = []  # (text, node_id)

    def send_progress_text(self, text, node_id, sid=None):
        self.progress_texts.append((text, node_id))


PromptServer.instance = PromptServer()
