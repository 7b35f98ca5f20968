"""One process of the two-process test: joins the distributed runtime, loads a checkpoint over the global mesh
(tp=8 across both processes' 4 CPU devices each) and writes the logits it computes."""

import os
import sys

process_id, port, checkpoint, prompt_file, out_file = sys.argv[1:6]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))

import tilert_jax  # noqa: E402
from tilert_jax.sharding import make_mesh  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
model = tilert_jax.load(checkpoint, mesh=make_mesh(tp=8))
logits = model.logits(np.load(prompt_file))
np.save(out_file, np.asarray(logits.addressable_data(0)))
jax.distributed.shutdown()
