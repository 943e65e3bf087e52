"""The one exception type the library raises for misuse."""


class VisualizerError(Exception):
    """Raised for bad input or misuse.

    Messages name the function, the variable, what was expected and what was
    got, so a user can fix the call without reading the library's source.
    """
