import jax, jax.numpy as jnp, numpy as np
from tilert_jax.bench import bench_config
from tilert_jax.models import family, deepseek as ds, moe
from tilert_jax.models.deepseek_linear import linear, swiglu
from tilert_jax.kernels import ops
from tilert_jax.params import init_params
c = bench_config("deepseek-v3", 2, 1)
fam = family(c)
p = init_params(fam.param_specs(c), jax.random.key(0), jnp.bfloat16)
fin = lambda a: (bool(jnp.all(jnp.isfinite(a))), float(jnp.max(jnp.abs(a.astype(jnp.float32)))))
layer = p.layers[1]
e = layer.mlp.experts
for seed in range(4):
    h = (jax.random.normal(jax.random.key(seed), (1, c.hidden_size)) ).astype(jnp.bfloat16)
    for impl in ("xla", "pallas"):
        lg = moe.router_logits(h, layer.mlp.router, impl)
        print(seed, impl, "router", fin(lg))
    w, idx = moe.route_sigmoid(moe.router_logits(h, layer.mlp.router, "xla"), layer.mlp.e_bias, c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
    print(seed, "idx", idx.tolist(), fin(w))
    a = jax.jit(lambda *args: moe.experts_pallas(*args, c.fp8_block))(h, idx, w, e.gate, e.up, e.down)
    b = jax.jit(lambda *args: moe.experts_gathered(*args, c.fp8_block))(h, idx, w, e.gate, e.up, e.down)
    print(seed, "experts pallas", fin(a), "gathered", fin(b))
    sp = layer.mlp.shared
    for impl in ("xla", "pallas"):
        m = swiglu(h, sp.gate, sp.up, c.fp8_block, impl)
        print(seed, impl, "shared swiglu", fin(m), "down", fin(linear(m, sp.down, c.fp8_block, impl)))
