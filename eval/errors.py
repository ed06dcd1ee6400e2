"""The one exception type for bad input: its message names the flag or file, the value and the fix."""


class EvalError(ValueError):
    """Bad input to an evaluation (missing folder, mismatched prompts, unloadable model, ...)."""
