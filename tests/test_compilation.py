import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdrop_jax import compilation


@pytest.fixture
def fresh_options(monkeypatch):
  """compiler_options() decided again for each test (it is cached per process)."""
  compilation.compiler_options.cache_clear()
  yield monkeypatch
  compilation.compiler_options.cache_clear()


def _conv_weight_gradient(x, w):
  conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.grad(lambda w: jnp.sum(conv(w) ** 2))(w)


def test_cpu_compiles_without_ynnpack_fusions_unless_asked(fresh_options):
  assert jax.default_backend() == "cpu"
  assert compilation.compiler_options() == compilation.CPU_OPTIONS
  x, w = jnp.ones((8, 32, 32, 16)), jnp.ones((3, 3, 16, 16))

  def compiled(options):
    return jax.jit(_conv_weight_gradient, compiler_options=options).lower(x, w).compile().as_text()

  if "ynn_fusion" not in compiled({}):
    pytest.skip("this jaxlib makes no YNNPACK fusions: nothing to turn off")
  assert "ynn_fusion" not in compiled(compilation.compiler_options())
  compilation.compiler_options.cache_clear()
  fresh_options.setenv(compilation.DEFAULTS_ENV, "1")
  assert compilation.compiler_options() == {}


def test_an_option_this_xla_does_not_know_falls_back_to_defaults(fresh_options):
  fresh_options.setattr(compilation, "CPU_OPTIONS", {"xla_cpu_no_such_option_anywhere": "1"})
  assert compilation.compiler_options() == {}
  assert float(compilation.jit(lambda x: x * 2)(3.0)) == 6.0


def test_jit_compiles_with_the_options_at_the_first_call(fresh_options):
  compiled_with = []
  real_jit = jax.jit
  fresh_options.setattr(compilation.jax, "jit",
                        lambda fun, **kw: compiled_with.append(kw) or real_jit(fun, **kw))
  double = compilation.jit(lambda x: x * 2)
  assert compiled_with == []  # defining it compiles (and starts) nothing
  assert float(double(3.0)) == 6.0 and float(double(4.0)) == 8.0
  assert compiled_with[-1] == {"compiler_options": compilation.CPU_OPTIONS}


def test_jit_matches_jax_jit_and_keeps_static_arguments(fresh_options):
  def conv_sum(width, x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y[..., :width] ** 2)

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  ours = compilation.jit(jax.grad(conv_sum, argnums=2), static_argnums=0)
  theirs = jax.jit(jax.grad(conv_sum, argnums=2), static_argnums=0)
  for width in (2, 5):
    np.testing.assert_allclose(ours(width, x, w), theirs(width, x, w), rtol=1e-5, atol=1e-5)
