"""The one error type for bad input: a single line naming the key, the value and what is accepted."""


class ConfigError(ValueError):
    """Bad configuration or input data, found before any model is loaded."""

    def __init__(self, key: str, value, accepted: str, context: str = ""):
        self.key, self.value, self.accepted, self.context = key, value, accepted, context
        super().__init__(f"{context}{key}={value!r} is not accepted: {accepted}")
