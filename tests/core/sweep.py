"""Argument sweeps of public functions: bad input gets a clear error or a correct result.

A case is a public function, arguments that work, and per argument an optional
``accepts`` predicate. The sweep replaces one argument by a generated value and
calls: the call either returns, or raises VisualizerError/TypeError/ValueError
whose message names that argument. Anything else (IndexError, AttributeError,
KeyError, a numpy RuntimeWarning) escaped from inside. Where ``accepts`` says the
value is not valid, the call must raise: a silent pass is a failure too.
Torch-free, so that tests/core can use it on every Python.
"""
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from visualizer import VisualizerError

CLEAR_ERRORS = (VisualizerError, TypeError, ValueError)


@dataclass
class Case:
    func: Callable[..., Any]
    kwargs: Callable[[], Dict[str, Any]]
    # argument -> predicate saying whether a value is valid (None: no opinion)
    accepts: Dict[str, Optional[Callable[[Any], bool]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def __repr__(self) -> str:
        return self.name


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def index_in(size: int) -> Callable[[Any], bool]:
    return lambda value: is_int(value) and -size <= value < size


def is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def number_in(low: float, high: float, low_open: bool = False) -> Callable[[Any], bool]:
    def accepts(value: Any) -> bool:
        if not isinstance(value, (int, float, np.integer, np.floating)) or is_bool(value):
            return False
        if math.isnan(value):
            return False
        return (low < value if low_open else low <= value) and value <= high

    return accepts


def one_of(*options: Any) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in options


def uniform_maps(shape):
    """Valid attention of a given shape (rows summing to 1), or an empty array."""
    if not shape or shape[-1] == 0:
        return np.zeros(shape)
    return np.full(shape, 1.0 / shape[-1])


# Values a user might pass by mistake, and some that are right for some arguments.
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 12),
    st.floats(width=32),
    st.sampled_from(["4", "", "mean", "max", "nearest", "bilinear", "x", "[CLS]"]),
    st.lists(st.integers(-3, 6), max_size=4),
    st.tuples(st.integers(-3, 6), st.integers(-3, 6)),
    st.lists(st.text(max_size=2), max_size=6),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
    st.builds(object),
    hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.int64, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
    ),
    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5).map(uniform_maps),
)


def check(case: Case, name: str, value: Any) -> None:
    """Call ``case`` with ``name=value``; assert a clear refusal or a result."""
    kwargs = case.kwargs()
    kwargs[name] = value
    call = f"{case.name}({name}={value!r})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.func(**kwargs)
        except OSError as error:
            # What open() says of a path it cannot use (a folder, a missing file) is clear.
            assert error.filename == value, f"{call} raised {type(error).__name__}: {error}"
            return
        except CLEAR_ERRORS as error:
            assert name in str(error), (
                f"{call} raised {type(error).__name__} without naming {name!r}: {error}"
            )
            return
    raw = [w for w in caught if not issubclass(w.category, UserWarning)]
    assert not raw, f"{call} let a warning out from inside: {raw[0].message}"
    accepts = case.accepts.get(name)
    assert accepts is None or accepts(value), f"{call} accepted an invalid value silently"


def sweep_test(cases, max_examples):
    """A test sweeping the arguments of each of ``cases``: one pytest case per function."""

    @pytest.mark.parametrize("case", cases, ids=repr)
    @settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow],
        # The same examples every run: CI passes or fails on the code, not on the draw.
        derandomize=True,
    )
    @given(data=st.data())
    def test(case, data):
        name = data.draw(st.sampled_from(sorted(case.kwargs())), label="argument")
        check(case, name, data.draw(values, label="value"))

    return test


def check_coverage(cases, module):
    """Every public function of ``module`` is swept, each with every one of its arguments."""
    swept = {inspect.unwrap(case.func) for case in cases}
    public = {
        value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == module.__name__
    }
    assert not public - swept, f"not swept: {sorted(f.__name__ for f in public - swept)}"
    for case in cases:
        arguments = set(inspect.signature(case.func).parameters) - {"self"}
        assert set(case.kwargs()) == arguments, f"{case.name}: sweep {sorted(case.kwargs())}"


def _function_of(func: Any) -> Any:
    """The function a case calls: a class's __init__, a method's function, unwrapped."""
    if inspect.isclass(func):
        func = vars(func)["__init__"]
    if isinstance(func, (classmethod, staticmethod)):
        func = func.__func__
    return getattr(inspect.unwrap(func), "__func__", inspect.unwrap(func))


def check_class_coverage(cases, cls, also=()):
    """Every public method of ``cls`` that takes arguments (and each of ``also``, e.g.
    ``"__call__"``, ``"__init__"``) is swept, each with every one of its arguments."""
    swept = {_function_of(case.func) for case in cases}
    public = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in also:
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if not inspect.isfunction(value):
            continue  # properties, attributes
        function = _function_of(value)
        if set(inspect.signature(function).parameters) - {"self", "cls"}:
            public[name] = function
    missing = sorted(name for name, function in public.items() if function not in swept)
    assert not missing, f"{cls.__qualname__}: not swept: {missing}"
    for case in cases:
        arguments = set(inspect.signature(case.func).parameters) - {"self"}
        assert set(case.kwargs()) == arguments, f"{case.name}: sweep {sorted(case.kwargs())}"
