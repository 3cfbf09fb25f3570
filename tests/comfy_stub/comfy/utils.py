"""Stand-in for comfy.utils: ProgressBar reporting to a hook the tests can read."""
PROGRESS_BAR_HOOK = None
UPDATES = []  # (value, total) of every update, for tests


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        UPDATES.append((self.current, self.total))

    def update(self, value):
        self.update_absolute(self.current + value)
