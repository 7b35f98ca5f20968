"""Model families. Each module provides `param_specs`, `forward`, `init_cache`, `prefill_layers` (a run of layers
from the tokens or from the stream of the run before: a stage of the engine's prefill), `prefill`, `decode_step` and
`sequence_compiler_options` (the XLA options its prefill and forward compile with)."""

from tilert_jax.models import dense

_FAMILIES = {"dense": dense}


def register(name: str, module) -> None:
    _FAMILIES[name] = module


def family(config):
    """The module that runs `config` (config.family names it)."""
    return _FAMILIES[config.family]


from tilert_jax.models import deepseek  # noqa: E402,F401  (registers the "deepseek" family and its model types)
