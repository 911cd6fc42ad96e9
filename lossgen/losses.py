"""The built-in catalog as attributes: ``lossgen.losses.huber`` is ``lossgen.get("huber")``."""
from .runtime import available, get


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return get(name)
    except ValueError as error:
        raise AttributeError(str(error)) from None


def __dir__():
    return available()
