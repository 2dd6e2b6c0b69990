import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from blockdrop_jax import BlockDropError, compilation
from blockdrop_jax.models import batch_norm, resnet


def _param_count(spec, size):
  shapes = jax.eval_shape(lambda: resnet.init(spec, jax.random.key(0), size))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name,params", [
    ("imagenet_resnet18", 11_689_512), ("imagenet_resnet50", 25_557_032),
    ("imagenet_resnet101", 44_549_160), ("cifar_resnet20", 269_722), ("cifar_resnet32", 464_154),
    ("cifar_resnet110", 1_727_962)])
def test_parameter_counts_match_published_models(name, params):
  # torchvision's ResNets, and the counts that akamaster's option-A CIFAR nets print.
  assert _param_count(resnet.make_spec(name), 224 if name.startswith("imagenet") else 32) == params


@pytest.mark.parametrize("name,blocks", [("cifar_resnet8", 3), ("cifar_resnet32", 15),
                                         ("cifar_resnet56", 27), ("cifar_resnet110", 54),
                                         ("imagenet_resnet10", 4), ("imagenet_resnet101", 33)])
def test_number_of_gated_blocks(name, blocks):
  assert resnet.make_spec(name).num_blocks == blocks


@pytest.mark.parametrize("shortcut", ["A", "avgpool", "projection"])
def test_policy_gates_blocks_and_all_ones_is_plain(shortcut):
  spec = resnet.make_spec("cifar_resnet20", shortcut=shortcut)
  variables = resnet.init(spec, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  plain = resnet.apply(spec, variables, x)
  chex.assert_shape(plain, (4, 10))
  chex.assert_trees_all_equal(resnet.apply(spec, variables, x, jnp.ones((4, 9))), plain)
  dropped = resnet.apply(spec, variables, x, jnp.zeros((4, 9)).at[0].set(1.0))
  chex.assert_trees_all_equal(dropped[0], plain[0])
  assert not np.allclose(dropped[1:], plain[1:])


def test_gated_forward_is_jittable_with_traced_policy():
  spec = resnet.make_spec("cifar_resnet20")
  variables = resnet.init(spec, jax.random.key(0))
  fn = jax.jit(lambda v, x, p: resnet.apply(spec, v, x, p))
  x = jnp.ones((2, 32, 32, 3))
  a = fn(variables, x, jnp.ones((2, 9)))
  b = fn(variables, x, jnp.zeros((2, 9)))
  assert fn._cache_size() == 1 and not np.allclose(a, b)


def test_policy_of_wrong_width_is_a_clear_error():
  spec = resnet.make_spec("cifar_resnet20")
  variables = resnet.init(spec, jax.random.key(0))
  with pytest.raises(BlockDropError, match=r"policy has shape \(2, 8\).*\(2, 9\)"):
    resnet.apply(spec, variables, jnp.ones((2, 32, 32, 3)), jnp.ones((2, 8)))


def test_unknown_architecture_is_a_clear_error():
  with pytest.raises(BlockDropError, match="unknown architecture 'resnet33'"):
    resnet.make_spec("resnet33")


def test_train_mode_updates_batch_stats_like_pytorch():
  spec = resnet.make_spec("cifar_resnet8", shortcut="avgpool")
  variables = resnet.init(spec, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
  _, updates = resnet.apply(spec, variables, x, train=True)
  old = variables["batch_stats"]["stem_bn"]["mean"]
  new = updates["batch_stats"]["stem_bn"]["mean"]
  conv = jax.lax.conv_general_dilated(
      (x - 0.0) / 1.0, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new, 0.9 * old + 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  # torch.nn.BatchNorm2d keeps the unbiased variance of the batch.
  np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["var"],
                             0.9 * variables["batch_stats"]["stem_bn"]["var"]
                             + 0.1 * np.var(np.asarray(conv), (0, 1, 2), ddof=1), rtol=1e-4)


def _batch_norm_values_and_grads(module, variables, x, cotangent, train):
  """(output, new batch stats, gradients of sum(output * cotangent) w.r.t. params and x)."""
  def loss(params, x):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              not train, mutable=["batch_stats"])
    return jnp.sum(y * cotangent), (y, updates["batch_stats"])

  (_, (y, stats)), (d_params, d_x) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      variables["params"], x)
  return y, stats, d_params, d_x


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("devices", [1, 8])
def test_batch_norm_equals_flax_batch_norm(train, devices):
  """Our BatchNorm (written-out gradient, sums as matrix products on CPU) against flax's, also
  with batch statistics over 8 devices under shard_map."""
  if jax.device_count() < devices:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")
  keys = jax.random.split(jax.random.key(0), 6)
  x = 3.0 * jax.random.normal(keys[0], (16, 5, 5, 6)) + 1.0
  cotangent = jax.random.normal(keys[1], x.shape)
  variables = {"params": {"scale": 1 + 0.1 * jax.random.normal(keys[2], (6,)),
                          "bias": jax.random.normal(keys[3], (6,))},
               "batch_stats": {"mean": jax.random.normal(keys[4], (6,)),
                               "var": jax.random.uniform(keys[5], (6,), minval=0.5, maxval=2)}}
  axis_name = None if devices == 1 else "batch"
  ours = batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5, axis_name=axis_name)
  theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-5, axis_name=axis_name, use_fast_variance=False)

  def both(x, cotangent):
    return [_batch_norm_values_and_grads(m, variables, x, cotangent, train) for m in (ours, theirs)]

  if devices > 1:
    rows, whole = PartitionSpec("batch"), PartitionSpec()
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("batch",))
    both = jax.shard_map(both, mesh=mesh, in_specs=(rows, rows),
                         out_specs=[(rows, whole, whole, rows)] * 2)
  ours_out, theirs_out = compilation.jit(both)(x, cotangent)
  if train:  # flax's running variance averages the biased batch variance, PyTorch's (ours) not
    n = x.shape[0] * x.shape[1] * x.shape[2]
    old = variables["batch_stats"]["var"]
    biased = (theirs_out[1]["var"] - 0.9 * old) / 0.1
    theirs_out[1]["var"] = 0.9 * old + 0.1 * biased * n / (n - 1)
  chex.assert_trees_all_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
  if train:  # the running statistics moved
    assert not np.allclose(ours_out[1]["mean"], variables["batch_stats"]["mean"])


def test_batch_norm_variance_keeps_float32_accuracy_for_large_means():
  """Two passes, as PyTorch: E[x^2] - E[x]^2 would be 0.3% off here."""
  x = np.random.default_rng(0).normal(30.0, 0.3, (16, 5, 5, 6)).astype(np.float32)
  _, mean, var = compilation.jit(batch_norm.batch_norm_train, static_argnums=(3, 4))(
      x, np.ones(6, np.float32), np.zeros(6, np.float32), 1e-5, None)
  exact = x.astype(np.float64).reshape(-1, 6)
  np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, exact.var(0), rtol=1e-5)


def test_batch_norm_sums_keep_float32_accuracy():
  rows = np.random.default_rng(0).normal(1.0, 1.0, (131072, 16)).astype(np.float32)
  exact = rows.astype(np.float64).sum(0)
  sums = np.asarray(compilation.jit(batch_norm._sum_rows_cpu)(rows))
  assert np.abs(sums / exact - 1).max() < 1e-6  # a plain product with ones: 1e-5


def test_policy_network_specs():
  cifar = resnet.policy_spec(resnet.make_spec("cifar_resnet110"))
  assert (cifar.name, cifar.num_classes, cifar.shortcut) == ("cifar_resnet8", 54, "avgpool")
  imagenet = resnet.policy_spec(resnet.make_spec("imagenet_resnet101"))
  assert (imagenet.name, imagenet.num_classes, imagenet.input_pool) == ("imagenet_resnet10", 33, 2)
  variables = jax.eval_shape(lambda: resnet.init(imagenet, jax.random.key(0)))
  out = jax.eval_shape(lambda v: resnet.apply(imagenet, v, jnp.zeros((1, 224, 224, 3))), variables)
  assert out.shape == (1, 33)


def test_spec_json_round_trip():
  spec = resnet.policy_spec(resnet.make_spec("imagenet_resnet50"))
  assert resnet.ResNetSpec.from_json(spec.to_json()) == spec


def _convolution_outputs_read_per_fusion(hlo_text: str) -> list[int]:
  """For each fusion of the compiled entry computation, how many convolution results it reads."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  opcode_of, operands_of = {}, {}
  for line in entry.splitlines():
    defined = line.strip().removeprefix("ROOT ").split(" = ", 1)
    if len(defined) == 2 and defined[0].startswith("%"):
      opcode, _, args = defined[1].split(" ", 1)[1].partition("(")
      opcode_of[defined[0]] = opcode
      operands_of[defined[0]] = [a.strip() for a in args.split(")")[0].split(",")]
  return [sum(opcode_of.get(a) == "convolution" for a in operands_of[name])
          for name, opcode in opcode_of.items() if opcode == "fusion"]


def test_compiled_network_does_not_recompute_earlier_blocks():
  """XLA:CPU fused each block's output computation into every later block's along the identity
  shortcuts (a ResNet-32 fusion read 6 convolutions; ResNet-110 ran up to 1.7x slower). Now only
  the stem's output is folded into the first block's: at most 2 convolution results per fusion."""
  spec = resnet.make_spec("cifar_resnet32")
  variables = resnet.init(spec, jax.random.key(0))
  hlo = jax.jit(lambda v, x: resnet.apply(spec, v, x)).lower(
      variables, jnp.zeros((2, 32, 32, 3))).compile(compilation.compiler_options()).as_text()
  reads = _convolution_outputs_read_per_fusion(hlo)
  assert sum(reads) >= spec.num_blocks and max(reads) <= 2, reads
