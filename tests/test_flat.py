"""FlatParams: named views over one flat parameter buffer and one flat gradient buffer."""
import copy
import pickle

import numpy as np
import pytest

import flatopt


def arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"W1": rng.standard_normal((8, 5)).astype(dtype), "b1": np.zeros(5, dtype),
            "W2": rng.standard_normal((5, 3)).astype(dtype), "b2": np.zeros(3, dtype)}


def test_views_share_the_flat_buffers():
    source = arrays()
    np.full(1 << 16, 3.0)  # (freed memory a buffer left uninitialised may take: its gradients must start at 0)
    flat = flatopt.FlatParams(source)
    assert flat.params.shape == (8 * 5 + 5 + 5 * 3 + 3,) and flat.params.dtype == np.float32
    assert flat.grads.shape == flat.params.shape and not flat.grads.any()  # (zeros, as documented)
    for name, value in source.items():
        np.testing.assert_array_equal(flat[name], value)
        assert flat[name].shape == value.shape
        assert np.shares_memory(flat[name], flat.params) and np.shares_memory(flat.grad(name), flat.grads)
        assert not np.shares_memory(flat[name], value)  # packing copies the inputs
    flat.grad("b1")[:] = 7
    a, b = flat.slices["b1"]
    np.testing.assert_array_equal(flat.grads[a:b], 7)
    assert list(flat) == ["W1", "b1", "W2", "b2"] and len(flat) == 4


def test_one_step_updates_every_named_array():
    flat = flatopt.FlatParams(arrays())
    before = {name: flat[name].copy() for name in flat}
    for name in flat:
        flat.grad(name)[...] = 1.0
    flatopt.SGD(lr=0.5).step(flat.params, flat.grads)
    for name in flat:
        np.testing.assert_array_equal(flat[name], before[name] - np.float32(0.5))


def test_groups_per_array_equal_separate_optimizers():
    flat = flatopt.FlatParams(arrays(np.float64))
    groups = flat.param_groups({"b1": {"weight_decay": 0.0}, "b2": {"weight_decay": 0.0, "lr": 1e-2}})
    assert [(g["start"], g["stop"]) for g in groups] == [(0, 40), (40, 45), (45, 60), (60, 63)]
    opt = flatopt.AdamW(lr=1e-3, weight_decay=0.1, param_groups=groups)
    separate = {name: flatopt.AdamW(lr=1e-2 if name == "b2" else 1e-3, weight_decay=0.0 if name[0] == "b" else 0.1)
                for name in flat}
    copies = {name: flat[name].reshape(-1).copy() for name in flat}
    rng = np.random.default_rng(1)
    for _ in range(10):
        flat.grads[:] = rng.standard_normal(len(flat.grads))
        for name in flat:
            separate[name].step(copies[name], flat.grad(name).reshape(-1).copy())
        opt.step(flat.params, flat.grads)
    for name in flat:
        np.testing.assert_array_equal(flat[name].reshape(-1), copies[name])


def test_neighbours_with_equal_overrides_merge():
    flat = flatopt.FlatParams(arrays())
    assert flat.param_groups() == [{"start": 0, "stop": 63}]
    merged = flat.param_groups({"W2": {"lr": 0.1}, "b2": {"lr": 0.1}})
    assert merged == [{"start": 0, "stop": 45}, {"start": 45, "stop": 63, "lr": 0.1}]


def test_neighbours_with_array_overrides_merge_by_value():
    """Array values (betas, which the optimizers take as arrays) are compared element by element:
    ``==`` on them raised NumPy's "truth value of an array is ambiguous"."""
    flat = flatopt.FlatParams({"W": np.ones((3, 2)), "b": np.zeros(2), "c": np.ones(2)})
    same = flat.param_groups({"W": {"betas": np.array([0.9, 0.99])}, "b": {"betas": (0.9, 0.99)}})
    assert [(g["start"], g["stop"]) for g in same] == [(0, 8), (8, 10)]
    other = flat.param_groups({"W": {"betas": np.array([0.9, 0.99])}, "b": {"betas": np.array([0.5, 0.9])}})
    assert [(g["start"], g["stop"]) for g in other] == [(0, 6), (6, 8), (8, 10)]
    flatopt.Adam(param_groups=other).step(flat.params, flat.grads)


def test_list_input_dtype_argument_and_errors():
    flat = flatopt.FlatParams([np.ones(3), np.zeros((2, 2))], dtype=np.float32)
    assert flat.params.dtype == np.float32 and list(flat) == [0, 1] and len(flat) == 2
    assert repr(flat) == "FlatParams(7 x float32; 0: (3,), 1: (2, 2))"
    with pytest.raises(ValueError, match="at least one"):
        flatopt.FlatParams({})
    with pytest.raises(TypeError, match="not an array"):
        flatopt.FlatParams({"a": [1.0, 2.0]})
    with pytest.raises(TypeError, match="float32 and float64"):
        flatopt.FlatParams({"a": np.ones(3, np.float16)})
    with pytest.raises(KeyError, match="nope"):
        flat.param_groups({"nope": {}})


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_copied_flatparams_names_views_of_its_own_buffers(how):
    """pickle and deepcopy copied each named array as an array of its own: gradients written
    through grad(name) never reached the copy's grads, and its steps never reached its arrays."""
    flat = flatopt.FlatParams(arrays(np.float64))
    twin = {"pickle": lambda f: pickle.loads(pickle.dumps(f)), "deepcopy": copy.deepcopy, "copy": copy.copy}[how](flat)
    for name in twin:
        assert np.shares_memory(twin[name], twin.params) and np.shares_memory(twin.grad(name), twin.grads)
        twin.grad(name)[...] = 1.0
    flatopt.SGD(lr=0.5).step(twin.params, twin.grads)
    for name in twin:
        np.testing.assert_array_equal(twin[name], arrays(np.float64)[name] - 0.5)
    assert np.shares_memory(twin.params, flat.params) == (how == "copy")


@pytest.mark.parametrize("overrides, error, words", [
    ({"b1": {"start": 0}}, ValueError, r"overrides of 'b1' set \['start'\]"),
    ({"W2": {"stop": 7, "lr": 0.1}}, ValueError, r"overrides of 'W2' set \['stop'\]"),
    ({"b1": 0.1}, TypeError, "overrides of 'b1' must be a dict"),
])
def test_overrides_that_are_not_hyperparameters_are_refused_naming_the_array(overrides, error, words):
    """A range in the overrides replaced the array's own: part of it was in no group, never updated."""
    with pytest.raises(error, match=words):
        flatopt.FlatParams(arrays()).param_groups(overrides)


def test_an_override_changed_later_leaves_the_other_arrays_trajectory_alone():
    """Giving one array its own lr splits the group it shared with its neighbours: they go on
    with their step counts (Adam's bias correction restarted for them, on warm moments)."""
    runs = []
    for change in (False, True):
        flat = flatopt.FlatParams(arrays(np.float64))
        opt = flatopt.Adam(lr=1e-3, param_groups=flat.param_groups())
        rng = np.random.default_rng(1)
        for t in range(8):
            flat.grads[:] = rng.standard_normal(len(flat.grads))
            if t == 4 and change:
                opt.param_groups = flat.param_groups({"b2": {"lr": 1e-2}})
            opt.step(flat.params, flat.grads)
        runs.append(flat)
    for name in ("W1", "b1", "W2"):
        np.testing.assert_array_equal(runs[1][name], runs[0][name])
    assert not np.array_equal(runs[1]["b2"], runs[0]["b2"])


@pytest.mark.parametrize("value, words", [
    (np.zeros(3, np.int64), "'b' is int64; .* \\(give dtype=... to convert it\\)"),
    (np.zeros(3, bool), "'b' is bool"),
    (np.zeros(3, np.complex64), "'b' is complex64"),
    (np.ma.masked_array(np.zeros(3), mask=[0, 1, 0]), "'b' is a masked array"),
])
def test_arrays_that_are_not_real_floats_are_refused_naming_the_array(value, words):
    """An integer bias made the whole model float64 (NumPy's promotion); a masked array's hidden
    values were packed and optimized."""
    with pytest.raises(TypeError, match=words):
        flatopt.FlatParams({"W": np.ones((2, 3), np.float32), "b": value})


def test_integer_arrays_are_converted_where_a_dtype_is_given():
    flat = flatopt.FlatParams({"W": np.ones((2, 3), np.float32), "b": np.arange(3)}, dtype=np.float32)
    assert flat.params.dtype == np.float32
    np.testing.assert_array_equal(flat["b"], np.arange(3, dtype=np.float32))
    with pytest.raises(TypeError, match="'b' is complex128"):
        flatopt.FlatParams({"b": np.zeros(3, complex)}, dtype=np.float64)


def test_mixed_float_arrays_pack_in_numpys_promoted_dtype_without_rounding():
    """The buffer's dtype is NumPy's promotion of the arrays' dtypes (a float64
    array after a float32 one is not rounded to float32)."""
    rng = np.random.default_rng(0)
    source = {"a": rng.standard_normal(4).astype(np.float32), "b": rng.standard_normal(3)}  # float64
    flat = flatopt.FlatParams(source)
    assert flat.params.dtype == np.result_type(np.float32, np.float64) == np.float64
    assert flat.grads.dtype == np.float64
    for name, value in source.items():
        np.testing.assert_array_equal(flat[name], value.astype(np.float64))


def test_empty_arrays_with_their_own_overrides_give_no_empty_groups():
    """An array of no elements covers nothing: no group of its own (the core
    refuses start == stop), whatever its overrides; the step equals separate core steps."""
    rng = np.random.default_rng(1)
    source = {"none": np.zeros((0, 3)), "w": rng.standard_normal(6), "b": np.zeros(0), "v": rng.standard_normal(2)}
    flat = flatopt.FlatParams(source)
    groups = flat.param_groups({"none": {"weight_decay": 0.0}, "b": {"lr": 0.5}, "v": {"weight_decay": 0.0}})
    assert [(g["start"], g["stop"]) for g in groups] == [(0, 6), (6, 8)]
    opt = flatopt.AdamW(lr=1e-2, weight_decay=0.1, param_groups=groups)
    ref = {"w": (flatopt.AdamW(lr=1e-2, weight_decay=0.1), source["w"].copy()),
           "v": (flatopt.AdamW(lr=1e-2, weight_decay=0.0), source["v"].copy())}
    for _ in range(3):
        flat.grads[:] = rng.standard_normal(len(flat.grads))
        for name, (core, buf) in ref.items():
            core.step(buf, flat.grad(name).copy())
        opt.step(flat.params, flat.grads)
    for name, (_, buf) in ref.items():
        np.testing.assert_array_equal(flat[name], buf)


def test_two_dimensional_array_overrides_are_compared_without_error():
    """Equal 2-D betas on two neighbours raised NumPy's "truth value of an array is ambiguous"
    while the groups were made; they merge, and the optimizer refuses them with its message."""
    flat = flatopt.FlatParams({"W": np.ones(3), "b": np.ones(1)})
    betas = {"betas": np.array([[0.9, 0.9]])}
    groups = flat.param_groups({"W": betas, "b": dict(betas)})
    assert [(g["start"], g["stop"]) for g in groups] == [(0, 4)]
    assert len(flat.param_groups({"W": betas, "b": {"betas": np.array([[0.9, 0.5]])}})) == 2
    with pytest.raises(TypeError, match="betas must be a pair of floats"):
        flatopt.Adam(param_groups=groups)


@pytest.mark.parametrize("wrap", [False, True], ids=["optimizer", "lookahead"])
def test_an_array_unfrozen_next_to_a_stepping_one_keeps_them_apart_given_the_optimizer(wrap):
    """Unfreezing A (``{"A": {"frozen": True}}`` to ``{}``) made A and its neighbour B one group,
    which started at step 0: Adam's bias correction restarted on B's warm moments.  Given the
    optimizer, ``param_groups`` keeps arrays at different step counts apart, and each goes on as
    a torch parameter would: B as Adam on B alone, A as Adam on A alone from its first step."""
    rng = np.random.default_rng(0)
    source = {"A": rng.standard_normal(4), "B": rng.standard_normal(5), "C": rng.standard_normal(3)}
    flat = flatopt.FlatParams(source)
    adam = flatopt.Adam(lr=1e-2, param_groups=flat.param_groups({"A": {"frozen": True}}))
    opt = flatopt.Lookahead(adam, k=100) if wrap else adam  # (k: no sync in these steps)
    alone = {name: (flatopt.Adam(lr=1e-2), source[name].copy()) for name in source}
    for t in range(7):
        if t == 3:
            assert len(flat.param_groups({})) == 1  # (without the optimizer: one group, at step 0)
            adam.param_groups = flat.param_groups({}, opt)  # (opt: the optimizer, or its Lookahead)
            assert [(g["start"], g["stop"]) for g in adam.param_groups] == [(0, 4), (4, 12)]
            assert [s["step"] for s in adam.group_state] == [0, 3]
        flat.grads[:] = rng.standard_normal(len(flat.grads))
        for name, (core, buf) in alone.items():
            if name != "A" or t >= 3:
                core.step(buf, flat.grad(name).copy())
        opt.step(flat.params, flat.grads)
    for name, (_, buf) in alone.items():
        np.testing.assert_array_equal(flat[name], buf)


def test_groups_given_to_an_optimizer_built_without_groups_go_on_as_torchs_groups():
    """``opt.param_groups = flat.param_groups(overrides, opt)`` on an optimizer built without
    groups (one count for the whole buffer): every array keeps that count, as a torch group
    whose weight decay is edited between steps does, bit for bit."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    flat = flatopt.FlatParams({"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)})
    opt = flatopt.AdamW(lr=0.1)
    tw, tb = (torch.nn.Parameter(torch.tensor(flat[name])) for name in ("W", "b"))
    ref = torch.optim.AdamW([{"params": [tw]}, {"params": [tb]}], lr=0.1, foreach=False)
    for t in range(6):
        if t == 3:
            opt.param_groups = flat.param_groups({"b": {"weight_decay": 0.0}}, opt)
            ref.param_groups[1]["weight_decay"] = 0.0
            assert [s["step"] for s in opt.group_state] == [3, 3]
        flat.grads[:] = rng.standard_normal(len(flat.grads))
        tw.grad, tb.grad = (torch.tensor(flat.grad(name)) for name in ("W", "b"))
        opt.step(flat.params, flat.grads)
        ref.step()
    np.testing.assert_array_equal(flat["W"], tw.detach().numpy())
    np.testing.assert_array_equal(flat["b"], tb.detach().numpy())


@pytest.mark.parametrize("make", [
    lambda w: {"emb": w, "out": w.T},
    lambda w: {"a": w, "b": w},
    lambda w: {"a": w[:2], "b": w[1:]},
    lambda w: {"a": w.reshape(-1)[::-1], "b": w[2]},
], ids=["transpose", "twice", "overlapping rows", "reversed"])
def test_arrays_that_share_memory_are_refused(make):
    """Tied weights (an embedding and its transposed decoder) were packed into two places of
    the flat buffer and silently untied; flatopt.torch refuses them too."""
    w = np.arange(12.0).reshape(3, 4)
    with pytest.raises(ValueError, match="share memory"):
        flatopt.FlatParams(make(w))


def test_interleaved_views_that_share_no_element_are_packed():
    x = np.arange(10.0)
    flat = flatopt.FlatParams({"even": x[::2], "odd": x[1::2], "other": np.ones(2)})
    np.testing.assert_array_equal(flat["odd"], [1, 3, 5, 7, 9])


def test_inputs_numpy_cannot_read_or_pack_get_clear_errors():
    """A torch tensor failed with NumPy's "Cannot interpret 'torch.float32' as a data type"; a
    bare array was taken as a list of its rows (0-d arrays named 0, 1, 2)."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="'w' is a torch.Tensor of dtype torch.float32"):
        flatopt.FlatParams({"w": torch.ones(3)})
    with pytest.raises(TypeError, match=r"takes a dict \(or list\) of arrays, got one ndarray"):
        flatopt.FlatParams(np.arange(3.0))


def test_bfloat16_arrays_are_real_floats():
    """bfloat16 (ml_dtypes', JAX's) was refused as not a real floating-point type, even with
    ``dtype=`` given: NumPy files it under kind ``V``.  It converts; alone, it asks for a dtype;
    beside float16, with which NumPy has no common dtype, too."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    half = np.array([1.5, -2.0, 3.0], ml_dtypes.bfloat16)
    flat = flatopt.FlatParams({"w": half}, dtype=np.float32)
    np.testing.assert_array_equal(flat["w"], [1.5, -2.0, 3.0])
    assert flatopt.FlatParams({"w": half, "b": np.zeros(2, np.float32)}).params.dtype == np.float32
    with pytest.raises(TypeError, match=r"dtype bfloat16; .* \(give dtype=np.float32 or np.float64"):
        flatopt.FlatParams({"w": half})
    with pytest.raises(TypeError, match="have no common dtype; give dtype=np.float32"):
        flatopt.FlatParams({"w": half, "h": np.ones(2, np.float16)})
    with pytest.raises(TypeError, match="'i' is int4"):
        flatopt.FlatParams({"i": np.zeros(2, ml_dtypes.int4)}, dtype=None)


# --- as_optax: the state-fit checks ------------------------------------------------------------
