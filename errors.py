"""The library's exceptions: one base class, one type for each thing a caller handles differently. Input errors
are also `ValueError`s, so code written for plain `ValueError` keeps working."""


class FluxError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(FluxError, ValueError):
    """A config file, config key or start-up setting that cannot be used; nothing was loaded."""


class InvalidInput(FluxError, ValueError):
    """Generation arguments out of range or unusable (size, steps, seed, an undecodable image)."""


class LoraError(FluxError, ValueError):
    """A LoRA that cannot be applied (unreadable file, no usable keys, shapes that do not fit)."""


class LoraNotLoaded(FluxError, LookupError):
    """Unloading a LoRA that is not loaded."""


class Cancelled(FluxError):
    """A job stopped because its cancel event was set (between denoising steps, or before it started)."""
