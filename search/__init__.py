"""search: the Optuna loop, soups, export, report and the `mergesearch` CLI.

Knows merge_core and evaluators only through their public APIs.
"""


class StudyError(ValueError):
    """A bad study/soup YAML, storage or output folder, named by `where` (file or field)."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


__version__ = "0.1.0"
__all__ = ["StudyError", "__version__"]
