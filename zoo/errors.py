"""The one exception type users see: the CLI prints it as a single line and exits 1."""


class ZooError(Exception):
    """Bad input or a failed check. The message names the file (when there is one) and the problem."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
