"""The one exception type of merge_core: a user-facing problem with a config or a model.

It names the file or field at fault; the CLI prints it as one line and exits 2.
"""


class MergeConfigError(ValueError):
    """A bad merge config, model folder or tensor, named by `where` (file, field or tensor)."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
