import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU (run by scripts/gpu/run_all.sh)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(family name, sharded, old_dialect) -> (torch model, directory); each made once per session."""
    import hf_models

    made = {}

    def get(name: str, sharded: bool = False, old_dialect: bool = False):
        key = (name, sharded, old_dialect)
        if key not in made:
            model = hf_models.make_model(name)
            directory = tmp_path_factory.mktemp(f"hf_{name}")
            made[key] = model, hf_models.write_checkpoint(model, directory, sharded, old_dialect)
        return made[key]

    return get
