"""Matrix views, side rule and projection of galore_jax.projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import galore_jax as gj
from galore_jax import projection


def test_plain_2d_is_taken_as_given():
  v = projection.matrix_view((5, 3), None)
  assert (v.batch_shape, v.m, v.n) == ((), 5, 3)
  x = jnp.arange(15.0).reshape(5, 3)
  np.testing.assert_array_equal(projection.to_matrix(x, v), x)


def test_dimension_numbers_view_is_output_by_input():
  # A Flax Dense kernel (in, out) seen as a torch Linear weight (out, in).
  x = jnp.arange(12.0).reshape(3, 4)
  v = projection.matrix_view(x.shape, gj.DimensionNumbers(reduction_axis=0, output_axis=1))
  np.testing.assert_array_equal(projection.to_matrix(x, v), x.T)


@pytest.mark.parametrize(
    "shape, dims, batch, m, n",
    [
        ((6, 2, 3), gj.DimensionNumbers(0, (1, 2)), (), 6, 6),  # q/k/v (d, h, hd)
        ((2, 3, 6), gj.DimensionNumbers((0, 1), 2), (), 6, 6),  # out (h, hd, d)
        ((4, 6, 8), gj.DimensionNumbers(1, 2), (4,), 8, 6),  # scanned (L, in, out)
        ((6, 4, 8), gj.DimensionNumbers(0, -1), (4,), 8, 6),  # layer axis in the middle
        ((2, 4, 6, 3), gj.DimensionNumbers(2, 3), (2, 4), 3, 6),
    ],
)
def test_view_roundtrip_and_sizes(shape, dims, batch, m, n):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  v = projection.matrix_view(shape, dims)
  assert (v.batch_shape, v.m, v.n) == (batch, m, n)
  mat = projection.to_matrix(x, v)
  assert mat.shape == (*batch, m, n)
  np.testing.assert_array_equal(projection.from_matrix(mat, v), x)


def test_scanned_kernel_slices_are_the_per_layer_matrices():
  x = jax.random.normal(jax.random.key(0), (3, 5, 7))  # (L, in, out)
  v = projection.matrix_view(x.shape, gj.DimensionNumbers(1, 2))
  mat = projection.to_matrix(x, v)
  for layer in range(3):
    np.testing.assert_array_equal(mat[layer], x[layer].T)


@pytest.mark.parametrize("d", [6, 5])  # square, and not: a transposed view has other sizes
def test_attention_kernel_is_heads_times_head_dim_by_d(d):
  x = jax.random.normal(jax.random.key(0), (d, 2, 3))  # q / k / v: (d, heads, head_dim)
  v = projection.matrix_view(x.shape, gj.DimensionNumbers(0, (1, 2)))
  np.testing.assert_array_equal(projection.to_matrix(x, v), x.reshape(d, 6).T)  # (h hd) x d
  o = jax.random.normal(jax.random.key(1), (2, 3, d))  # the output kernel: (heads, head_dim, d)
  v = projection.matrix_view(o.shape, gj.DimensionNumbers((0, 1), 2))
  np.testing.assert_array_equal(projection.to_matrix(o, v), o.reshape(6, d).T)  # d x (h hd)


@pytest.mark.parametrize(
    "proj_type, tall, wide, square",
    [
        ("std", (False, True), (True, False), (False, True)),
        ("reverse_std", (True, False), (False, True), (True, False)),
        ("left", (True, False), (True, False), (True, False)),
        ("right", (False, True), (False, True), (False, True)),
        ("full", (True, True), (True, True), (True, True)),
    ],
)
def test_side_rule_matches_reference_table(proj_type, tall, wide, square):
  assert projection.projection_sides(proj_type, 8, 4) == tall
  assert projection.projection_sides(proj_type, 4, 8) == wide
  assert projection.projection_sides(proj_type, 4, 4) == square


def test_project_and_back_match_matrix_products():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  g = jax.random.normal(k1, (2, 6, 5))
  p = jnp.linalg.qr(jax.random.normal(k2, (2, 6, 3)))[0]
  q = jnp.linalg.qr(jax.random.normal(k3, (2, 5, 3)))[0]
  gn, pn, qn = map(np.asarray, (g, p, q))
  pt = np.swapaxes(pn, -1, -2)
  qt = np.swapaxes(qn, -1, -2)
  np.testing.assert_allclose(projection.project(g, p, None), pt @ gn, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(projection.project(g, None, q), gn @ qn, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(projection.project(g, p, q), pt @ gn @ qn, rtol=1e-5, atol=1e-6)
  c = np.ones((2, 3, 3), np.float32)
  np.testing.assert_allclose(projection.project_back(c, p, q), pn @ c @ qt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      projection.project_back(c[:, :, :1].repeat(5, -1), p, None), pn @ c[:, :, :1].repeat(5, -1),
      rtol=1e-5, atol=1e-6)


def test_project_keeps_gradient_dtype():
  g = jnp.ones((4, 3), jnp.bfloat16)
  q = jnp.eye(3, 2, dtype=jnp.bfloat16)
  assert projection.project(g, None, q).dtype == jnp.bfloat16


@pytest.mark.parametrize("sides", ["left", "right", "both"])
def test_project_back_emits_out_dtype_from_float32_accumulation(sides):
  # bf16 out: the float32 product rounded once (within a bf16 ulp of the oracle), also when
  # the two-sided case's intermediate is float32, never a bf16-rounded intermediate.
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.standard_normal((2, 48, 8)), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((2, 40, 8)), jnp.bfloat16)
  left, right = {"left": (p, None), "right": (None, q), "both": (p, q)}[sides]
  c = jnp.asarray(rng.standard_normal((2, 8 if left is not None else 48,
                                        8 if right is not None else 40)), jnp.bfloat16)
  want = np.asarray(c, np.float64)
  if left is not None:
    want = np.asarray(left, np.float64) @ want
  if right is not None:
    want = want @ np.swapaxes(np.asarray(right, np.float64), -1, -2)
  got = projection.project_back(c, left, right, out_dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2.0**-8, atol=1e-2)
  f32 = projection.project_back(c, left, right)
  assert f32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(f32, np.float64), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "dims, match",
    [
        (gj.DimensionNumbers(0, 3), "does not fit"),
        (gj.DimensionNumbers(0, 0), "share an axis"),
        (gj.DimensionNumbers((0, 0), 1), "repeats"),
        (gj.DimensionNumbers((), 1), "non-empty"),
        ("not dims", "DimensionNumbers"),
    ],
)
def test_bad_dimension_numbers_raise(dims, match):
  with pytest.raises(ValueError, match=match):
    projection.matrix_view((2, 3, 4), dims, "params['w']")


def test_a_callable_giving_one_dimension_numbers_is_that_value():
  """dimension_numbers=f and dimension_numbers=f(params) select the same leaves: a single
  DimensionNumbers applies to the 2-D leaves (mask=None), not to the bias beside them."""
  from galore_jax import plans
  tree = {"b": jnp.zeros(4), "w": jnp.zeros((6, 4))}
  dims = gj.DimensionNumbers(reduction_axis=1, output_axis=0)
  given = plans.leaf_plans(tree, None, dims, 2, "std")
  called = plans.leaf_plans(tree, None, lambda params: dims, 2, "std")
  assert given == called and given[0] is None and given[1].view.m == 6


def test_nd_leaf_without_dimension_numbers_raises():
  with pytest.raises(ValueError, match="dimension_numbers"):
    projection.matrix_view((2, 3, 4), None, "params['w']")


@pytest.mark.parametrize(
    "shape, dims, agrees",
    [
        ((12, 6), None, True),  # plain 2-D, tall
        ((6, 12), None, True),  # plain 2-D, wide
        ((8, 8), None, True),  # plain 2-D, square: both project axis 0's side
        ((16, 4, 2), gj.DimensionNumbers(0, (1, 2)), True),  # N-D, 8 x 16 (out x in)
        ((16, 4, 4), gj.DimensionNumbers(0, (1, 2)), False),  # N-D, square: opposite sides
    ],
)
def test_reverse_std_against_optax_contrib_galore(shape, dims, agrees):
  """The README's claim: reverse_std projects what optax.contrib.galore projects, except a
  square matrix viewed through dimension numbers (contrib: input side, ours: output)."""
  from optax.contrib import _galore as contrib  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  g = {"k": jax.random.normal(jax.random.key(0), shape)}
  contrib_dims = None if dims is None else contrib.GaLoreDimensionNumbers(
      dims.reduction_axis, dims.output_axis)
  theirs = optax.contrib.galore(1e-2, rank=2, weight_dimension_numbers=contrib_dims)
  ours = gj.galore_adamw(1e-2, rank=2, proj_type="reverse_std", dimension_numbers=dims,
                         mask=True)
  p_theirs = theirs.update(g, theirs.init(g), g)[1][0].projector["k"]
  (b,) = ours.update(g, ours.init(g), g)[1][0].bases
  p_ours = b.left if b.left is not None else b.right
  # The same subspace <=> the projectors P P^T agree (bases may differ by signs).  Each
  # basis spans one side of the matrix, whichever way round the view is.
  assert p_ours.shape == p_theirs.shape
  same = np.allclose(p_ours @ p_ours.T, p_theirs @ p_theirs.T, atol=1e-4)
  assert same == agrees


def test_a_bf16_kernel_read_transposed_trains_on_cpu():
  """A bf16 leaf whose matrix is its transpose (dimension numbers (0, 1)), its gradient taken
  in the same jit: XLA:CPU fused the transpose into a bf16 x bf16 -> f32 dot it has no kernel
  for, and the step failed at run time (found by a helper)."""
  import optax
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  x, y = jax.random.normal(k1, (64, 8)), jax.random.normal(k2, (64, 16))
  params = {"h": (0.1 * jax.random.normal(k0, (8, 16))).astype(jnp.bfloat16)}
  loss = lambda p: jnp.mean((x @ p["h"].astype(jnp.float32) - y) ** 2)
  tx = gj.galore_adamw(0.02, rank=4, dimension_numbers={"h": gj.DimensionNumbers(0, 1)})

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state, start = tx.init(params), float(loss(params))
  for _ in range(20):
    params, state = step(params, state)
  assert params["h"].dtype == jnp.bfloat16 and float(loss(params)) < 0.95 * start


@pytest.mark.parametrize("make", [
    lambda: gj.galore_adamw(1e-2, rank=1, update_proj_gap=2),
    lambda: gj.galore_adafactor(1e-2, rank=1, update_proj_gap=2),
    lambda: gj.fira_adamw(1e-2, rank=1, update_proj_gap=2),
    lambda: gj.apollo_adamw(1e-2, rank=1, update_proj_gap=2, proj="svd"),
    lambda: gj.ldadamw(1e-2, rank=1),
], ids=["galore_adamw", "galore_adafactor", "fira_adamw", "apollo_adamw", "ldadamw"])
def test_a_float16_leaf_whose_coefficients_exceed_its_range_steps_as_in_float32(make):
  """float16 holds at most 65504: a row of 12 entries of 2e4..3e4 has a coefficient of about
  9e4 on its top direction, and squared far more.  The float16 leaf's step is finite and that
  of the float32 run on the same (upcast) gradients, in float16, over a refresh (the
  coefficients and their inner state were float16: inf, then NaN, updates)."""
  rng = np.random.default_rng(0)
  a = rng.uniform(0.5, 1.0, 16) * rng.choice([-1, 1], 16)
  grads = [jnp.asarray(np.outer(a, rng.uniform(2e4, 3e4, 12) * rng.choice([-1, 1], 12)),
                       jnp.float16) for _ in range(3)]
  runs = {}
  for dtype in (jnp.float16, jnp.float32):
    tx = make()
    params = {"w": jnp.zeros((16, 12), dtype)}
    state, update = tx.init(params), jax.jit(tx.update)
    runs[dtype] = []
    for g in grads:
      u, state = update({"w": g.astype(dtype)}, state, params)
      runs[dtype].append(u["w"])
  for low, high in zip(runs[jnp.float16], runs[jnp.float32]):
    assert low.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(low, np.float32), high, rtol=2e-2,
                               atol=2e-2 * float(jnp.max(jnp.abs(high))))


Q = jnp.eye(3)[:, :2]


@pytest.mark.parametrize("call, match", [
    # complex in: the imaginary part was dropped, float32 out, without a word
    (lambda: projection.project(jnp.ones((4, 3)), None, Q * (1 + 1j)),
     r"^project: right is complex64: expected real arrays \(the subspace is real\)\.$"),
    (lambda: projection.project(jnp.ones((4, 3)) * 1j, None, Q),
     r"^project: g_Bxmxn is complex64: expected real arrays"),
    (lambda: projection.project(jnp.ones((4, 3)), None, None),  # (AttributeError on None)
     r"^project: left and right are both None: expected a basis on at least one side\.$"),
    (lambda: projection.project_back(jnp.ones((4, 2)) * 1j, None, Q),
     r"^project_back: c is complex64: expected real arrays"),
    (lambda: projection.project_back(jnp.ones((4, 2)), None, Q, out_dtype=jnp.int32),  # zeros
     r"^project_back: out_dtype must be a real floating dtype or None, got"),
])
def test_project_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()


V = projection.matrix_view((6, 4), None)


@pytest.mark.parametrize("call, match", [
    # a float size was truncated (a view of 2 rows), a negative one taken
    (lambda: projection.matrix_view((2.5, 4), None),
     r"^matrix_view: shape must be non-negative ints, got \(2\.5, 4\)\.$"),
    (lambda: projection.matrix_view((6, -4), None),
     r"^matrix_view: shape must be non-negative ints, got \(6, -4\)\.$"),
    # a leaf of another shape with as many elements was reshaped into the view's matrix
    (lambda: projection.to_matrix(jnp.zeros((4, 6)), V),
     r"^to_matrix: x has shape \(4, 6\), but the view is of shape \(6, 4\)\.$"),
    (lambda: projection.from_matrix(jnp.zeros((4, 6)), V),
     r"^from_matrix: x_mat has shape \(4, 6\), but the view's matrices are \(6, 4\)\.$"),
    # a rank of 0, -1 or 2.5 gave a shape of zeros, negatives or floats
    (lambda: projection.coefficient_shape(V, 0, False, True),
     r"^coefficient_shape: rank must be an int >= 1, got 0\.$"),
    (lambda: projection.coefficient_shape(V, 2.5, False, True),
     r"^coefficient_shape: rank must be an int >= 1, got 2\.5\.$"),
])
def test_view_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()
