"""The errors budgetlora expects: every one derives from `BudgetloraError`, which the CLI answers with one line
(`budgetlora: error: ...`) and exit 2 instead of a traceback. Each also keeps the built-in base callers already
catch (ValueError, RuntimeError, FileNotFoundError). An error that is not a BudgetloraError is a bug."""
from __future__ import annotations


class BudgetloraError(Exception):
    """Base of every error the CLI answers with one line and exit 2."""


class ConfigError(BudgetloraError, ValueError):
    """A config that cannot be run: bad value, unknown key, over budget."""


class DataError(BudgetloraError, ValueError):
    """Input data that cannot be used as given."""


class RunFolderError(BudgetloraError, ValueError):
    """A run folder whose files are missing, corrupt or cannot be written."""
